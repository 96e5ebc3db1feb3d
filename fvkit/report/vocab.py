"""What a function vector says in words: its top tokens through the model's own output layer.

    decode_vector(lm, fv, k=5)     # [(' walked', 0.031), (' went', 0.02), ...]

The vector is treated as a final hidden state: it goes through the final
normalisation and the unembedding (both found through the ModelSpec's
``final_norm_path`` and ``lm_head_path``), then a softmax over the vocabulary.
A model whose config sets ``final_logit_softcapping`` has its logits capped the
way its own forward pass caps them.
"""

from __future__ import annotations

import torch

from fvkit.models import adapters
from fvkit.errors import FvkitError
from fvkit.models.placement import to_module

#: Probabilities are reported to this many decimals (the reference's decoding rounds to 5).
PROB_DECIMALS = 5


def vector_logits(lm, fv: torch.Tensor) -> torch.Tensor:
    """Logits (vocab,) of ``fv`` read as the last hidden state."""
    hidden = lm.dims.hidden_size
    if fv.numel() != hidden:
        raise FvkitError(f"function vector has {fv.numel()} entries, the model's hidden size is {hidden}")
    norm = adapters.resolve_final_norm(lm.model, lm.spec)
    head = adapters.resolve_lm_head(lm.model, lm.spec)
    with torch.no_grad():
        # Where the final norm runs and in its dtype (an offloaded module's weights are on
        # ``meta`` between calls); accelerate's hook moves the result on to the head.
        first = norm if any(True for _ in norm.parameters()) else head  # a model without final norm
        x = to_module(fv.reshape(1, 1, hidden), first, default_dtype=lm.model.dtype)
        logits = head(norm(x)).reshape(-1).float().cpu()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def decode_vector(lm, fv: torch.Tensor, k: int = 10) -> list:
    """The ``k`` most probable tokens and their probabilities, most probable first."""
    if not isinstance(k, int) or k < 1:
        raise FvkitError(f"k must be a positive number of tokens, got {k!r}")
    probs = torch.softmax(vector_logits(lm, fv), dim=-1)
    values, ids = torch.topk(probs, k=min(k, probs.numel()))
    return [(lm.tokenizer.decode([int(i)]), round(float(p), PROB_DECIMALS)) for p, i in zip(values, ids)]
