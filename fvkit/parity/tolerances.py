"""Named tolerances of the parity gates and the drift measure they apply to.

    drift = tensor_drift("mean_activations", ours, ref, MEAN_ACT_REL_TOL, "MEAN_ACT_REL_TOL")
    assert drift.ok, drift.message()

A tensor matches the reference when its largest absolute difference is at most
``rel_tol`` times the largest absolute reference entry. Scaling by the largest
entry (not entry by entry) keeps near-zero entries from dominating: a float32
forward pass that differs only in summation order changes every entry by a few
ulps of the *typical* magnitude, not of its own value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

#: Mean head activations (M2). Both sides run the same float32 forward pass on
#: CPU; what is left is summation-order noise, a few float32 ulps (~1e-7) of the
#: largest activation. 1e-5 leaves two orders of margin over that noise, while a
#: 1e-3 change of one weight (the perturbed-model check) moves it ~1e-4.
MEAN_ACT_REL_TOL = 1e-5

#: Indirect effects (M3), relative to the largest |IE|. The IE is a difference of
#: two softmax probabilities averaged over trials, so its noise floor is that of
#: float32 probabilities (~1e-7); same margin argument as MEAN_ACT_REL_TOL.
IE_REL_TOL = 1e-5

#: Function vector (M4), relative to its largest |entry|: a sum of out-projected
#: mean activations, so it inherits MEAN_ACT_REL_TOL's noise floor.
FV_REL_TOL = 1e-5

#: Top-head scores are rounded to 4 decimals by both sides; a drift far below the
#: tolerances above can still flip the last rounded digit, so scores may differ by
#: one unit of the 4th decimal. Heads themselves (layer, head) must be identical.
TOP_HEAD_SCORE_ABS_TOL = 1e-4 + 1e-12

#: Rank lists (M4) are compared exactly, except where fvkit's own logits show a
#: tie: the logit at the reference's rank within this fraction of the item's
#: largest |logit| of the target's logit. A function vector within FV_REL_TOL moves
#: logits by about that fraction, so closer neighbours may legitimately swap.
RANK_TIE_REL_TOL = 1e-5

#: Injection guard (M4): adding the function vector must move the intervened
#: logits by more than float32 rounding noise of a single forward pass, or the
#: edit never reached the model (a hook on a path that did not fire, an edit
#: returned into a discarded tuple, ...).
MIN_INJECTION_LOGIT_CHANGE = 1e-6

#: Every tolerance by name, for the report.
TOLERANCES = {
    "MEAN_ACT_REL_TOL": MEAN_ACT_REL_TOL,
    "IE_REL_TOL": IE_REL_TOL,
    "FV_REL_TOL": FV_REL_TOL,
    "TOP_HEAD_SCORE_ABS_TOL": TOP_HEAD_SCORE_ABS_TOL,
    "RANK_TIE_REL_TOL": RANK_TIE_REL_TOL,
    "MIN_INJECTION_LOGIT_CHANGE": MIN_INJECTION_LOGIT_CHANGE,
}


@dataclass
class Drift:
    """How far one stage's tensor is from the reference's.

        d = tensor_drift("indirect_effect", ours, ref, IE_REL_TOL, "IE_REL_TOL")
        d.ok, d.rel_drift, d.worst_index
    """

    stage: str
    tol: float
    tol_name: str
    max_abs_drift: float = 0.0
    rel_drift: float = 0.0
    ref_scale: float = 0.0
    worst_index: Optional[tuple] = None
    ours_at_worst: Optional[float] = None
    ref_at_worst: Optional[float] = None
    shape_ours: tuple = ()
    shape_ref: tuple = ()
    problem: str = ""  # shape mismatch or non-finite values: not a drift at all
    source: str = "reference"

    @property
    def ok(self) -> bool:
        return not self.problem and self.rel_drift <= self.tol

    def metrics(self) -> dict:
        return {
            "stage": self.stage,
            "source": self.source,
            "max_abs_drift": self.max_abs_drift,
            "rel_drift": self.rel_drift,
            "ref_max_abs": self.ref_scale,
            "tolerance": self.tol,
            "tolerance_name": self.tol_name,
            "worst_index": list(self.worst_index) if self.worst_index is not None else None,
            "shape": list(self.shape_ours),
            "ok": self.ok,
            **({"problem": self.problem} if self.problem else {}),
        }

    def message(self) -> str:
        head = f"{self.stage} vs {self.source}"
        if self.problem:
            return f"{head}: {self.problem}"
        verdict = "within" if self.ok else "exceeds"
        return (
            f"{head}: drift {self.rel_drift:.3e} of the largest |reference| entry ({self.ref_scale:.4g}) "
            f"{verdict} tolerance {self.tol_name}={self.tol:g}; max abs drift {self.max_abs_drift:.3e} "
            f"at index {list(self.worst_index) if self.worst_index is not None else '-'} "
            f"(fvkit {self.ours_at_worst!r}, reference {self.ref_at_worst!r})"
        )


def as_float64(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64)
    return torch.tensor(value, dtype=torch.float64)


def tensor_drift(stage: str, ours, ref, tol: float, tol_name: str, source: str = "reference") -> Drift:
    """Max absolute drift, the same relative to the largest |reference| entry, and where."""
    a, b = as_float64(ours), as_float64(ref)
    drift = Drift(stage=stage, tol=tol, tol_name=tol_name, shape_ours=tuple(a.shape), shape_ref=tuple(b.shape), source=source)
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


@dataclass
class Mismatch:
    """The first place two exact-match structures differ.

        m = first_mismatch(["a", "b"], ["a", "c"], "prompts")   # path 'prompts[1]'
    """

    path: str
    ours: object
    ref: object

    def message(self) -> str:
        return f"{self.path}: fvkit {_short(self.ours)} != reference {_short(self.ref)}"


def _short(value, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_mismatch(ours, ref, path: str = "") -> Optional[Mismatch]:
    """Depth-first exact comparison; lists and dicts are compared element by element
    so that the message names the first differing element, not the whole structure."""
    if isinstance(ours, (list, tuple)) and isinstance(ref, (list, tuple)):
        for i, (x, y) in enumerate(zip(ours, ref)):
            found = first_mismatch(x, y, f"{path}[{i}]")
            if found:
                return found
        if len(ours) != len(ref):
            return Mismatch(f"{path} length", len(ours), len(ref))
        return None
    if isinstance(ours, dict) and isinstance(ref, dict):
        ok, rk = {str(k): v for k, v in ours.items()}, {str(k): v for k, v in ref.items()}
        for key in sorted(set(ok) | set(rk), key=_natural_key):
            if key not in ok or key not in rk:
                return Mismatch(f"{path}[{key!r}]", ok.get(key, "<missing>"), rk.get(key, "<missing>"))
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
        return Mismatch(path or "<value>", ours, ref)
    return None


def _natural_key(key: str):
    return (0, int(key), "") if key.lstrip("-").isdigit() else (1, 0, key)


@dataclass
class GateCheck:
    """All findings of one gate against one reference source.

        check = GateCheck("M2", "snapshot")
        check.drifts.append(tensor_drift(...)); check.ok; check.failures()
    """

    gate: str
    source: str
    drifts: list = field(default_factory=list)
    mismatches: list = field(default_factory=list)  # (stage, Mismatch, cause or "")
    notes: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.drifts) and not self.mismatches

    def failures(self) -> list:
        out = [d.message() for d in self.drifts if not d.ok]
        for stage, mm, cause in self.mismatches:
            out.append(f"{stage} vs {self.source}: {mm.message()}" + (f" [cause: {cause}]" if cause else ""))
        return out

    def metrics(self) -> dict:
        return {
            "source": self.source,
            "ok": self.ok,
            "drifts": [d.metrics() for d in self.drifts],
            "mismatches": [{"stage": s, "path": m.path, "fvkit": _short(m.ours), "reference": _short(m.ref), "cause": c}
                           for s, m, c in self.mismatches],
            **({"notes": self.notes} if self.notes else {}),
        }
