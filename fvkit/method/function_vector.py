"""Top heads and the function vector (gate M4a).

    heads = select_top_heads(ie, n_top_heads=10)       # [[layer, head, score], ...]
    fv = compute_function_vector(lm, mean_acts, heads)  # (1, hidden)

Heads are ranked by their indirect effect averaged over trials (scores rounded
to 4 decimals, as the reference lists them). The vector is the sum over those
heads of the out-projection applied to a vector holding only that head's mean
activation at the last slot, so a biased out-projection adds its bias once per
head, as in the reference.
"""

from __future__ import annotations

import numpy as np
import torch

from fvkit.models import adapters
from fvkit.errors import FvkitError
from fvkit.models.placement import to_module

#: Decimals of the scores in the head list (the reference's rounding).
SCORE_DECIMALS = 4


def select_top_heads(indirect_effect: torch.Tensor, n_top_heads: int) -> list:
    mean_ie = indirect_effect.mean(dim=0)
    total = mean_ie.numel()
    if not 1 <= n_top_heads <= total:
        raise FvkitError(f"--n-top-heads {n_top_heads} is outside 1..{total} (this model has {total} heads)")
    vals, inds = torch.topk(mean_ie.view(-1), k=n_top_heads, largest=True)
    layers, heads = np.unravel_index(inds.numpy(), tuple(mean_ie.shape))
    return [[int(l), int(h), round(v.item(), SCORE_DECIMALS)] for l, h, v in zip(layers, heads, vals)]


def compute_function_vector(lm, mean_acts: torch.Tensor, top_heads: list) -> torch.Tensor:
    dims = lm.dims
    width = dims.n_heads * dims.head_dim
    fv = torch.zeros(1, 1, dims.hidden_size)
    with torch.no_grad():
        for layer, head, _ in top_heads:
            o_proj = adapters.resolve_out_proj(lm.model, lm.spec, layer)
            x = torch.zeros(width)
            x[head * dims.head_dim:(head + 1) * dims.head_dim] = mean_acts[layer, head, -1]
            # Computed where the out-projection is (a GPU, disk-offloaded weights loaded by
            # accelerate's hook), in its dtype; summed on the CPU in float32 like the reference.
            out = o_proj(to_module(x.reshape(1, 1, width), o_proj, default_dtype=lm.model.dtype))
            fv += out.to(device=fv.device, dtype=fv.dtype)
    return fv.reshape(1, dims.hidden_size)
