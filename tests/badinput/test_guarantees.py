"""README's "What detbalance never does" names the tests that hold each guarantee: every one must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## What detbalance never does")
    return text[start : text.index("\n## ", start + 1)]


def test_every_guarantee_is_backed_by_a_named_test_that_exists() -> None:
    section = _section()
    for guarantee in ("evaluates on training images", "replaces a file it did not write", "loses a finished run",
                      "loads pickled code"):
        assert f"never {guarantee}" in section
    named = 0
    current = None
    for ref in re.findall(r"`((?:tests/[\w/]+\.py::)?[\w\[\]-]+)`", section):
        if "::" in ref:
            current, ref = ref.split("::")
        if current is None or not re.match(r"^(test_\w+|\[[\w-]+\])", ref):
            continue
        source = (ROOT / current).read_text(encoding="utf-8")
        if ref.startswith("["):
            assert f'("{ref[1:-1]}",' in source, f"{current}: no case {ref}"
        else:
            name = ref.split("[")[0]
            assert f"def {name}(" in source, f"{current}: no test {name}"
            if "[" in ref:
                assert f'("{ref.split("[")[1][:-1]}",' in source, f"{current}: no case {ref}"
        named += 1
    assert named >= 12
