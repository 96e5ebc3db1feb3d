"""fvkit's function vector evaluated by the reference, where the reference cannot build its own.

    meta["injected_vector"] = describe_vector(fv, why="...", stages=["zero_shot", "shuffled"])
    changed = vector_change(meta["injected_vector"], ours["function_vector"])   # None: the same vector

On a model whose n_heads*head_dim != hidden_size the reference's
``compute_function_vector`` cannot sum the heads' outputs, but its ``n_shot_eval``
evaluates any vector it is given. The runner then hands it fvkit's vector, and the
zero-shot and shuffled-label numbers are the reference's evaluation of fvkit's
vector. The record says so, and keeps the vector (norm, sha256 of its float32
bytes and the values) so that a gate can tell whether fvkit's vector is still the
one the reference evaluated: if it changed, the reference's intervention numbers
belong to another vector.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from fvkit.parity.tolerances import FV_REL_TOL

#: Key of the record in the runner's meta (and in a snapshot's environment).
INJECTED_KEY = "injected_vector"
#: The tolerance a vector gets in M4 (FV_REL_TOL, relative to its largest |entry|), and so
#: the one that decides "the same vector" here: a vector within it moves the logits by no
#: more than the rank comparison already allows for (RANK_TIE_REL_TOL).
VECTOR_TOLERANCE = "FV_REL_TOL"


def _flat(vector) -> np.ndarray:
    if hasattr(vector, "detach"):
        vector = vector.detach().cpu().float().numpy()
    return np.asarray(vector, dtype=np.float32).reshape(-1)


def vector_sha256(vector) -> str:
    """SHA-256 of the vector's float32 values, little-endian, in order."""
    return hashlib.sha256(_flat(vector).astype("<f4").tobytes()).hexdigest()


def describe_vector(vector, why: str, stages) -> dict:
    """The record of an injected vector: where it came from, who evaluated it, and the vector."""
    flat = _flat(vector)
    return {"source": "fvkit", "evaluated_by": "the reference's n_shot_eval", "stages": list(stages),
            "why": why, "width": int(flat.size), "norm": float(np.linalg.norm(flat.astype(np.float64))),
            "sha256": vector_sha256(flat), "values": [float(v) for v in flat]}


def vector_change(record: dict, ours) -> Optional[str]:
    """Why fvkit's vector ``ours`` is not the one the reference evaluated (None when it is:
    the same bytes, or within the function vector's M4 tolerance)."""
    if ours is None:
        return "fvkit produced no function vector to check against the one the reference evaluated"
    flat = _flat(ours)
    if vector_sha256(flat) == record.get("sha256"):
        return None
    from fvkit.parity.drift import tensor_drift

    drift = tensor_drift(INJECTED_KEY, flat.tolist(), record.get("values") or [], FV_REL_TOL, VECTOR_TOLERANCE)
    if drift.ok:
        return None
    return (f"fvkit's function vector (norm {float(np.linalg.norm(flat)):.6g}, sha256 {vector_sha256(flat)[:12]}) is "
            f"not the one the reference evaluated (norm {record.get('norm', float('nan')):.6g}, sha256 "
            f"{str(record.get('sha256'))[:12]}): {drift.message()}; the reference's intervention numbers belong to "
            f"the old vector, so regenerate the reference numbers (tox -e reference)")
