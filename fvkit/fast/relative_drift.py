"""How far a recomputed tensor is from the one it stands in for, relative to the latter's scale.

    relative_drift(fast_ie, exact_ie) <= FAST_VS_EXACT_REL_TOL

Shared by the fast indirect effect's agreement checks and the shared-prefix
attention's first-call check, which compare in the same terms.
"""

from __future__ import annotations

import torch


def relative_drift(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference as a fraction of the largest absolute reference entry."""
    scale = float(ref.abs().max())
    diff = float((ours - ref).abs().max())
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale
