"""The function vector as the block writes it into the residual stream.

    fv_block = block_written_vector(lm, mean_acts, top_heads)   # (1, hidden), or None

Gemma 2 and 3 pass the attention output through a norm of the block's own
(``post_attention_layernorm``) before adding it to the residual stream. The
reference builds its vector from out-projection outputs alone, which on these
models is a vector of a different scale from anything the attention ever
writes: on gemma3-270m it is about 0.6% of the residual stream's norm and moves
no answer. This vector is what the block would add if only the top heads were
active: per layer, the out-projection applied to those heads' mean activations
at the last slot (zero elsewhere, so a bias enters once per layer, as in the
block), passed through that block's attention-output norm; then summed over
layers. The norm is not linear, so heads are summed inside a layer before it.

It is built only where the spec declares ``attn_output_norm``, evaluated and
reported beside the reference-defined vector (``fvkit run``), and never enters
a parity comparison: the gates keep the reference's definition.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

from fvkit.models import adapters


def heads_by_layer(top_heads: list) -> dict:
    """layer -> its top heads, in the order the layers first appear in the head list."""
    grouped = defaultdict(list)
    for layer, head, *_ in top_heads:
        grouped[int(layer)].append(int(head))
    return dict(grouped)


def layer_attention_input(lm, mean_acts: torch.Tensor, layer: int, heads: list) -> torch.Tensor:
    """The out-projection's input holding only ``heads``' mean activations at the last slot."""
    dims = lm.dims
    x = torch.zeros(dims.n_heads * dims.head_dim)
    for head in heads:
        x[head * dims.head_dim:(head + 1) * dims.head_dim] = mean_acts[layer, head, -1]
    return x.reshape(1, 1, -1).to(lm.model.dtype)


def block_written_vector(lm, mean_acts: torch.Tensor, top_heads: list) -> Optional[torch.Tensor]:
    """(1, hidden) sum over layers of the normed out-projection output of that layer's top heads;
    None when the spec declares no attention-output norm (the reference's vector is then
    already what the block writes)."""
    if lm.spec.attn_output_norm is None:
        return None
    fv = torch.zeros(1, 1, lm.dims.hidden_size)
    with torch.no_grad():
        for layer, heads in heads_by_layer(top_heads).items():
            o_proj = adapters.resolve_out_proj(lm.model, lm.spec, layer)
            norm = adapters.resolve_attn_output_norm(lm.model, lm.spec, layer)
            written = norm(o_proj(layer_attention_input(lm, mean_acts, layer, heads)))
            fv += written.to(fv.dtype)
    return fv.reshape(1, lm.dims.hidden_size)
