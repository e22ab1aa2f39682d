"""The public API is exactly what tests/api_surface.json lists: removing or renaming a public name is a
deliberate change to that file, never an accident (kornia's lesson). Regenerate with
``python tests/test_api_surface.py``."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

SURFACE = Path(__file__).with_name("api_surface.json")
MODULES = [
    "detbalance.types",
    "detbalance.losses",
    "detbalance.sampling",
    "detbalance.detectors",
    "detbalance.data",
    "detbalance.engine",
    "detbalance.analysis",
    "detbalance.config",
    "detbalance.compare",
]


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def current_surface() -> dict[str, dict[str, str]]:
    surface = {}
    for name in MODULES:
        module = importlib.import_module(name)
        names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        entries = {}
        for attr in sorted(names):
            obj = getattr(module, attr)
            entries[attr] = _signature(obj) if callable(obj) and not inspect.isclass(obj) else type(obj).__name__
        surface[name] = entries
    return surface


def test_every_public_name_exists():
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            assert hasattr(module, attr), f"{name}.__all__ lists {attr!r}, which does not exist"


def test_api_surface_is_unchanged():
    expected = json.loads(SURFACE.read_text())
    actual = current_surface()
    for module, names in expected.items():
        missing = sorted(set(names) - set(actual.get(module, {})))
        assert not missing, f"{module} lost public names {missing}; update {SURFACE.name} if intended"
        changed = {n: (names[n], actual[module][n]) for n in names if n in actual[module] and names[n] != actual[module][n]}
        assert not changed, f"{module}: signatures changed {changed}; update {SURFACE.name} if intended"
    added = {m: sorted(set(actual[m]) - set(expected.get(m, {}))) for m in actual}
    assert not any(added.values()), f"new public names {added}; add them to {SURFACE.name}"


if __name__ == "__main__":
    SURFACE.write_text(json.dumps(current_surface(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SURFACE}")
