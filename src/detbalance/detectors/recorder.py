"""An explicit sink for what the imbalance remedies did in each training step.

A :class:`BalanceRecorder` is handed to an adapter (``balance_retinanet(..., recorder=rec)``) instead of
a global event storage (detectron2's ``get_event_storage()``). While recording it never synchronises
with the host: every ``record_*`` call runs under :func:`torch.no_grad`, detaches its inputs and folds
them into small per-step aggregates kept on the inputs' device (counts, a fixed-bin loss histogram, a
GHM density, per-class loss sums). Memory per step is bounded by the number of names recorded, never by
the number of anchors or RoIs. Only :meth:`BalanceRecorder.to_records` copies the aggregates to the host.

Typical use::

    rec = BalanceRecorder()
    model = balance_retinanet(model, cls_loss=SigmoidFocalLoss(), box_loss=L1Loss(), normalizer="per_batch",
                              recorder=rec)
    for step, (images, targets) in enumerate(loader):
        rec.start_step(step)
        loss = sum(model(images, targets).values())
        ...
    records = rec.to_records()      # list of JSON-serialisable dicts, one per step
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["BalanceRecorder"]


def _as_count(x: Tensor | int, what: str) -> Tensor:
    t = torch.as_tensor(x).detach()
    if t.dim() > 1:
        raise ValueError(f"{what} must be a 0-d or 1-d (per-level) tensor, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex():
        t = t.round()
    return t.to(torch.int64)


def _to_python(t: Tensor) -> Any:
    return t.tolist()


class BalanceRecorder:
    """Per-step aggregates of sampled counts, loss histograms, GHM densities and per-class losses.

    Records are grouped by step: :meth:`start_step` opens a step (calling it again with the same step
    number keeps accumulating into it, e.g. under gradient accumulation); a ``record_*`` call before any
    :meth:`start_step` opens step 0. Calls with the same name in one step are summed (counts, histograms,
    densities, class sums); :meth:`record_counts` with per-level tensors must keep the same length.

    Args:
        loss_bins: Number of log-spaced bins of the loss histogram.
        loss_range: ``(low, high)`` of the histogram, ``0 < low < high``. Losses below ``low`` (zeros
            included) fall into the first bin, losses above ``high`` into the last.

    The schema of one record (see :meth:`to_records`)::

        {"step": int,
         "counts": {name: {"positives": int | list[int], "negatives": ..., "ignored": ... | None}},
         "losses": {name: {"count": int, "sum": float, "max": float, "histogram": list[int]}},
         "ghm_density": {name: list[float]},
         "class_losses": {name: {"sum": list[float], "count": list[int]}},   # index = label 0..K
         "class_values": {name: {"sum": list[float], "count": list[float]}}}  # index = class 1..K

    ``loss_bin_edges`` (``loss_bins + 1`` floats) is a property of the recorder, not repeated per step.
    """

    def __init__(self, *, loss_bins: int = 32, loss_range: tuple[float, float] = (1e-6, 1e2)) -> None:
        if not isinstance(loss_bins, int) or loss_bins < 1:
            raise ValueError(f"loss_bins must be a positive int, got {loss_bins!r}")
        low, high = loss_range
        if not (0 < low < high and math.isfinite(high)):
            raise ValueError(f"loss_range must satisfy 0 < low < high < inf, got {loss_range!r}")
        self.loss_bins = loss_bins
        self.loss_range = (float(low), float(high))
        self._steps: list[dict[str, Any]] = []
        self._current: dict[str, Any] | None = None

    # ------------------------------------------------------------------ steps
    @property
    def loss_bin_edges(self) -> list[float]:
        """The ``loss_bins + 1`` log-spaced edges of the loss histogram."""
        low, high = self.loss_range
        return torch.logspace(math.log10(low), math.log10(high), self.loss_bins + 1, dtype=torch.float64).tolist()

    @property
    def num_steps(self) -> int:
        """Number of steps recorded so far."""
        return len(self._steps)

    def start_step(self, step: int) -> None:
        """Open step ``step`` (an int); a repeated call with the current step keeps accumulating."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an int, got {step!r}")
        if self._current is not None and self._current["step"] == step:
            return
        self._current = {"step": step, "counts": {}, "losses": {}, "ghm_density": {}, "class_losses": {},
                         "class_values": {}}
        self._steps.append(self._current)

    def _entry(self) -> dict[str, Any]:
        if self._current is None:
            self.start_step(0)
        return self._current  # type: ignore[return-value]  # start_step always sets it

    def clear(self) -> None:
        """Forget every recorded step (e.g. after writing :meth:`to_records` to disk)."""
        self._steps = []
        self._current = None

    # --------------------------------------------------------------- records
    @torch.no_grad()
    def record_counts(
        self, name: str, positives: Tensor | int, negatives: Tensor | int, ignored: Tensor | int | None = None
    ) -> None:
        """Add sampled example counts under ``name``.

        Args:
            name: Key, e.g. ``"retinanet/anchors"``.
            positives: ``Tensor[]`` or per-level ``Tensor[L]`` number of positive examples.
            negatives: Same shape as ``positives``: the negatives that took part in the loss.
            ignored: Same shape, or ``None`` when the method has no ignored examples.
        """
        pos = _as_count(positives, "positives")
        neg = _as_count(negatives, "negatives")
        if neg.shape != pos.shape:
            raise ValueError(f"negatives shape {tuple(neg.shape)} != positives shape {tuple(pos.shape)}")
        ign = None
        if ignored is not None:
            ign = _as_count(ignored, "ignored")
            if ign.shape != pos.shape:
                raise ValueError(f"ignored shape {tuple(ign.shape)} != positives shape {tuple(pos.shape)}")
        store = self._entry()["counts"]
        old = store.get(name)
        if old is None:
            store[name] = {"positives": pos.clone(), "negatives": neg.clone(), "ignored": ign}
            return
        if old["positives"].shape != pos.shape:
            raise ValueError(
                f"counts {name!r} were recorded with shape {tuple(old['positives'].shape)} in this step, "
                f"got {tuple(pos.shape)}"
            )
        if (old["ignored"] is None) != (ign is None):
            raise ValueError(f"counts {name!r}: ignored must be given in every call of a step or in none")
        old["positives"] = old["positives"] + pos
        old["negatives"] = old["negatives"] + neg
        if ign is not None:
            old["ignored"] = old["ignored"] + ign

    @torch.no_grad()
    def record_losses(self, name: str, losses: Tensor, *, mask: Tensor | None = None) -> None:
        """Fold the losses of the selected examples into a fixed-bin histogram under ``name``.

        Args:
            name: Key, e.g. ``"retinanet/cls_positive"``.
            losses: ``Tensor[N]`` non-negative per-example losses (any float dtype; kept on its device).
            mask: Optional ``Tensor[N]`` (bool): only these examples are recorded. Selecting with a mask
                here instead of ``losses[mask]`` avoids a device-to-host synchronisation.
        """
        x = losses.detach().reshape(-1).float()
        low, high = self.loss_range
        logx = torch.log10(x.clamp(min=low, max=high))
        width = (math.log10(high) - math.log10(low)) / self.loss_bins
        idx = ((logx - math.log10(low)) / width).floor().to(torch.int64).clamp_(0, self.loss_bins - 1)
        if mask is not None:
            keep = mask.detach().reshape(-1).to(device=x.device, dtype=torch.bool)
            if keep.shape != x.shape:
                raise ValueError(f"mask shape {tuple(mask.shape)} != losses shape {tuple(losses.shape)}")
            idx = torch.where(keep, idx, torch.full_like(idx, self.loss_bins))  # extra slot, dropped below
            x = torch.where(keep, x, torch.zeros_like(x))
            count = keep.sum()
        else:
            count = torch.tensor(x.numel(), dtype=torch.int64, device=x.device)
        hist = torch.bincount(idx, minlength=self.loss_bins + 1)[: self.loss_bins]
        total = x.sum(dtype=torch.float64)
        peak = x.max() if x.numel() else torch.zeros((), device=x.device)
        store = self._entry()["losses"]
        old = store.get(name)
        if old is None:
            store[name] = {"count": count, "sum": total, "max": peak, "histogram": hist}
            return
        old["count"] = old["count"] + count
        old["sum"] = old["sum"] + total
        old["max"] = torch.maximum(old["max"], peak)
        old["histogram"] = old["histogram"] + hist

    @torch.no_grad()
    def record_ghm_density(self, name: str, density: Tensor) -> None:
        """Store a GHM gradient-density histogram ``Tensor[M]`` (e.g. ``GHMCLoss.last_density``)."""
        d = density.detach().reshape(-1).float()
        store = self._entry()["ghm_density"]
        old = store.get(name)
        if old is None:
            store[name] = d.clone()
        elif old.shape != d.shape:
            raise ValueError(f"ghm density {name!r} has {old.numel()} bins in this step, got {d.numel()}")
        else:
            store[name] = old + d

    @torch.no_grad()
    def record_class_losses(self, name: str, labels: Tensor, losses: Tensor, num_classes: int) -> None:
        """Add per-class loss sums and example counts under ``name``.

        Args:
            name: Key, e.g. ``"retinanet/cls"``.
            labels: ``Tensor[N]`` int64 labels (convention of :mod:`detbalance.types`); ``-1`` rows are
                skipped, ``0`` is background, ``1..num_classes`` foreground.
            losses: ``Tensor[N]`` loss of each example (for a sigmoid head: summed over its columns).
            num_classes: ``K``; the sums have ``K + 1`` entries indexed by label.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        lab = labels.detach().reshape(-1)
        val = losses.detach().reshape(-1).float()
        if lab.shape != val.shape:
            raise ValueError(f"labels shape {tuple(lab.shape)} != losses shape {tuple(val.shape)}")
        keep = lab >= 0
        # Labels above num_classes would be silently folded into the last bin by a clamp; instead they
        # land in an extra slot that is dropped, so the K+1 sums stay exact without a host sync.
        idx = torch.where(keep, lab.clamp(max=num_classes + 1), torch.full_like(lab, num_classes + 1))
        sums = torch.zeros(num_classes + 2, dtype=torch.float64, device=val.device)
        sums.index_add_(0, idx, val.double())
        counts = torch.bincount(idx, minlength=num_classes + 2)
        sums, counts = sums[: num_classes + 1], counts[: num_classes + 1]
        store = self._entry()["class_losses"]
        old = store.get(name)
        if old is None:
            store[name] = {"sum": sums, "count": counts}
        elif old["sum"].shape != sums.shape:
            raise ValueError(
                f"class losses {name!r} were recorded with num_classes={old['sum'].numel() - 1} in this "
                f"step, got {num_classes}"
            )
        else:
            old["sum"] = old["sum"] + sums
            old["count"] = old["count"] + counts

    @torch.no_grad()
    def record_class_values(self, name: str, total: Tensor, count: Tensor) -> None:
        """Add a per-class quantity a loss applied (sums and weights of its mean) under ``name``.

        Used for the long-tail losses' per-class factors: Seesaw's mitigation / compensation factors (summed
        over the foreground RoIs of other classes, with their count), EQLv2's gradient ratio (count 1 per step),
        the federated loss's drawn classes (0/1 per step).

        Args:
            name: Key, e.g. ``"seesaw/mitigation"``.
            total: ``Tensor[K]`` sums, index ``j`` = class ``j + 1``.
            count: ``Tensor[K]`` what each sum is a sum of (``total / count`` is the mean).
        """
        t = total.detach().reshape(-1).double()
        c = count.detach().reshape(-1).double()
        if t.shape != c.shape:
            raise ValueError(f"class values {name!r}: total shape {tuple(t.shape)} != count shape {tuple(c.shape)}")
        store = self._entry().setdefault("class_values", {})
        old = store.get(name)
        if old is None:
            store[name] = {"sum": t.clone(), "count": c.clone()}
        elif old["sum"].shape != t.shape:
            raise ValueError(f"class values {name!r} have {old['sum'].numel()} classes in this step, got {t.numel()}")
        else:
            old["sum"] = old["sum"] + t
            old["count"] = old["count"] + c

    # ---------------------------------------------------------------- output
    def to_records(self) -> list[dict[str, Any]]:
        """Copy every step's aggregates to the host: a list of JSON-serialisable dicts, one per step.

        This is the only method that synchronises with the device. The schema is in the class docstring.
        """
        out = []
        for entry in self._steps:
            rec: dict[str, Any] = {"step": entry["step"], "counts": {}, "losses": {}, "ghm_density": {},
                                   "class_losses": {}, "class_values": {}}
            for name, c in entry["counts"].items():
                rec["counts"][name] = {
                    "positives": _to_python(c["positives"]),
                    "negatives": _to_python(c["negatives"]),
                    "ignored": None if c["ignored"] is None else _to_python(c["ignored"]),
                }
            for name, h in entry["losses"].items():
                rec["losses"][name] = {
                    "count": int(h["count"]),
                    "sum": float(h["sum"]),
                    "max": float(h["max"]),
                    "histogram": _to_python(h["histogram"]),
                }
            for name, d in entry["ghm_density"].items():
                rec["ghm_density"][name] = _to_python(d)
            for name, s in entry["class_losses"].items():
                rec["class_losses"][name] = {"sum": _to_python(s["sum"]), "count": _to_python(s["count"])}
            for name, v in entry.get("class_values", {}).items():
                rec["class_values"][name] = {"sum": _to_python(v["sum"]), "count": _to_python(v["count"])}
            out.append(rec)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume recording: settings and the (CPU) aggregates of every step.

        Holds only dicts, lists, strings, numbers and tensors, so ``torch.load(weights_only=True)`` reads it.
        """
        def cpu(obj: Any) -> Any:
            if isinstance(obj, Tensor):
                return obj.detach().cpu().clone()
            if isinstance(obj, dict):
                return {k: cpu(v) for k, v in obj.items()}
            return obj

        return {
            "loss_bins": self.loss_bins,
            "loss_range": list(self.loss_range),
            "steps": [cpu(e) for e in self._steps],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; the next :meth:`start_step` with the last step continues it."""
        if int(state["loss_bins"]) != self.loss_bins or tuple(state["loss_range"]) != self.loss_range:
            raise ValueError(
                f"state was saved with loss_bins={state['loss_bins']}, loss_range={state['loss_range']}; "
                f"this recorder has loss_bins={self.loss_bins}, loss_range={self.loss_range}"
            )
        self._steps = [dict(e) for e in state["steps"]]
        self._current = self._steps[-1] if self._steps else None
