"""The comparison engine: how far a tensor drifts from the reference, and where two structures differ.

    drift = tensor_drift("mean_activations", ours, ref, MEAN_ACT_REL_TOL, "MEAN_ACT_REL_TOL")
    assert drift.ok, drift.message()
    mismatch = first_mismatch(["a", "b"], ["a", "c"], "prompts")   # path 'prompts[1]'

A tensor matches the reference when its largest absolute difference is at most
``rel_tol`` times the largest absolute reference entry, or at most the stage's
absolute floor where it has one (the indirect effects of the random tiny
models, whose largest values lie below float32's resolution of probabilities). Scaling by the largest
entry (not entry by entry) keeps near-zero entries from dominating: a float32
forward pass that differs only in summation order changes every entry by a few
ulps of the *typical* magnitude, not of its own value. The tolerances
themselves, with their reasons, are in :mod:`fvkit.parity.tolerances`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fvkit.parity.records import DriftRecord, MismatchRecord


def as_float64(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64)
    return torch.tensor(value, dtype=torch.float64)


def tensor_drift(stage: str, ours, ref, tol: float, tol_name: str, source: str = "reference",
                 floor: float = 0.0, floor_name: str = "") -> DriftRecord:
    """Max absolute drift, the same relative to the largest |reference| entry, and where.

    ``floor`` (named ``floor_name``) is an absolute drift that always passes: the
    float32 noise of a quantity whose reference values are too small for ``tol`` of
    them to be resolved (see :data:`fvkit.parity.tolerances.ABS_FLOORS`)."""
    a, b = as_float64(ours), as_float64(ref)
    drift = DriftRecord(stage=stage, tol=tol, tol_name=tol_name, shape_ours=tuple(a.shape), shape_ref=tuple(b.shape),
                        source=source, floor=floor, floor_name=floor_name)
    if a.shape != b.shape:
        drift.problem = f"shape {list(a.shape)} differs from the reference's {list(b.shape)}"
        return drift
    if a.numel() == 0:
        return drift
    if not torch.isfinite(a).all():
        bad = tuple(int(i) for i in torch.nonzero(~torch.isfinite(a))[0])
        drift.problem = f"non-finite fvkit value {a[bad].item()!r} at index {list(bad)}"
        return drift
    diff = (a - b).abs()
    flat = int(torch.argmax(diff))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    drift.max_abs_drift = float(diff.reshape(-1)[flat])
    drift.ref_scale = float(b.abs().max())
    drift.worst_index = index
    drift.ours_at_worst = float(a.reshape(-1)[flat])
    drift.ref_at_worst = float(b.reshape(-1)[flat])
    if drift.ref_scale > 0:
        drift.rel_drift = drift.max_abs_drift / drift.ref_scale
    else:
        # An all-zero reference admits no relative slack: any drift is infinite.
        drift.rel_drift = 0.0 if drift.max_abs_drift == 0 else math.inf
    return drift


def first_mismatch(ours, ref, path: str = "") -> Optional[MismatchRecord]:
    """Depth-first exact comparison; lists and dicts are compared element by element
    so that the message names the first differing element, not the whole structure."""
    if isinstance(ours, (list, tuple)) and isinstance(ref, (list, tuple)):
        for i, (x, y) in enumerate(zip(ours, ref)):
            found = first_mismatch(x, y, f"{path}[{i}]")
            if found:
                return found
        if len(ours) != len(ref):
            return MismatchRecord.of(f"{path} length", len(ours), len(ref))
        return None
    if isinstance(ours, dict) and isinstance(ref, dict):
        ok, rk = {str(k): v for k, v in ours.items()}, {str(k): v for k, v in ref.items()}
        for key in sorted(set(ok) | set(rk), key=_natural_key):
            if key not in ok or key not in rk:
                return MismatchRecord.of(f"{path}[{key!r}]", ok.get(key, "<missing>"), rk.get(key, "<missing>"))
            found = first_mismatch(ok[key], rk[key], f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(ours, bool) or isinstance(ref, bool) or type(ours) is not type(ref):
        # JSON round trips turn tuples into lists and int keys into strings only;
        # 1 vs 1.0 still counts as equal.
        if isinstance(ours, (int, float)) and isinstance(ref, (int, float)) and ours == ref:
            return None
    if ours != ref:
        return MismatchRecord.of(path or "<value>", ours, ref)
    return None


def _natural_key(key: str):
    return (0, int(key), "") if key.lstrip("-").isdigit() else (1, 0, key)
