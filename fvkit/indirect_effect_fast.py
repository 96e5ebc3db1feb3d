"""Indirect effect of every head, recomputing only the last position.

    effect = fast_trial(lm, setup, mean_acts)      # (n_layers, n_heads), like the exact path

The patch changes one head's out-projection input at the last token only.
Attention is causal, so every earlier position computes exactly what it
computed in the clean run, at every layer. The keys and values of those
positions are therefore taken from the clean run's cache, and only the last
token is run again, for all heads of a layer at once: batch row ``h`` patches
head ``h``, and one extra row stays unpatched.

The unpatched row does two jobs. Its probabilities are the baseline each
effect is measured against, so whatever rounding the cached single-token path
adds is common to both sides of the difference and cancels. And its logits are
compared with the clean full-prompt run's: a cache, position or mask that the
model did not take as intended shows up there as an error, not as plausible
but wrong effects.

Everything model-specific stays behind the model's own ``forward`` and
:mod:`fvkit.adapters`; the cache is driven through the two operations every
transformers version offers (repeat rows, drop trailing positions), or
rebuilt when the model returns plain tuples.
"""

from __future__ import annotations

import torch

from . import adapters
from .errors import FvkitError
from .tracer import EditInput

#: Fast and exact effects agree when they differ by at most this fraction of the
#: largest absolute effect of the trial. Both paths compute the same quantity in
#: float32; they differ only in how matrix products are split (one full prompt
#: against a cached single token), which moves probabilities by a few float32
#: ulps. The tiny random models have effects down to ~1e-9 absolute, so the
#: bound is relative; 1e-5 is ~100x the drift measured on every zoo model and
#: far below the gap between any two top heads that could swap places.
FAST_VS_EXACT_REL_TOL = 1e-5

#: The unpatched row of every batched step must reproduce the clean run's
#: last-token logits to within this fraction of their largest magnitude.
#: Rounding gives ~1e-6; a wrong position, mask or cache is off by O(1).
CLEAN_ROW_REL_TOL = 1e-4


def _is_cache_object(cache) -> bool:
    return hasattr(cache, "crop") and hasattr(cache, "batch_repeat_interleave")


def _is_legacy_cache(cache) -> bool:
    return isinstance(cache, (tuple, list)) and all(
        isinstance(layer, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in layer)
        for layer in cache)


def _check_cache(cache) -> None:
    if not (_is_cache_object(cache) or _is_legacy_cache(cache)):
        raise FvkitError(
            f"fast indirect effect cannot reuse this model's key/value cache "
            f"({type(cache).__name__}); run with --ie-mode exact"
        )


def _cache_length(cache) -> int:
    if _is_cache_object(cache):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])


def _drop_last_position(cache):
    """The cache without its last position (keys/values are (batch, heads, pos, dim))."""
    if _is_cache_object(cache):
        cache.crop(-1)  # negative: remove this many positions, on every transformers version
        return cache
    return tuple(tuple(t[..., :-1, :] for t in layer) for layer in cache)


def _repeat_rows(cache, n: int):
    if _is_cache_object(cache):
        cache.batch_repeat_interleave(n)
        return cache
    # The model concatenates new positions onto these, so broadcast views suffice.
    return tuple(tuple(t.expand(n, *t.shape[1:]) for t in layer) for layer in cache)


def prefix_cache(model, inputs, n_rows: int):
    """Clean last-token logits, and the clean cache of all but the last position, ``n_rows`` times over."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=True)
    cache = out.past_key_values
    _check_cache(cache)
    n_tokens = inputs["input_ids"].shape[1]
    cache = _repeat_rows(_drop_last_position(cache), n_rows)
    if _cache_length(cache) != n_tokens - 1:
        raise FvkitError(
            f"fast indirect effect: the model's cache holds {_cache_length(cache)} positions after "
            f"dropping the last of {n_tokens}; run with --ie-mode exact"
        )
    return out.logits[0, -1, :], cache


def head_patch(layer: int, slots: list, mean_acts: torch.Tensor, n_heads: int, head_dim: int):
    """Edit for the batched step: row ``h`` gets head ``h``'s mean activation at the last token."""
    rows = torch.arange(n_heads)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        view = x.view(*x.shape[:-1], n_heads, head_dim)
        # Same order as the exact path: with several slots, the last one wins.
        for slot in slots:
            view[rows, -1, rows] = mean_acts[layer, :, slot].to(x.dtype)
        return x

    return fn


def _check_clean_row(logits: torch.Tensor, clean_logits: torch.Tensor, layer: int) -> None:
    scale = float(clean_logits.abs().max().clamp_min(1.0))
    drift = float((logits - clean_logits).abs().max()) / scale
    if not drift <= CLEAN_ROW_REL_TOL:
        raise FvkitError(
            f"fast indirect effect: at layer {layer} the unpatched row's logits differ from the "
            f"clean run's by {drift:.2e} (relative, allowed {CLEAN_ROW_REL_TOL:.0e}); this model's "
            f"cached last-token step does not reproduce its full forward pass; run with --ie-mode exact"
        )


def fast_trial(lm, setup, mean_acts: torch.Tensor) -> torch.Tensor:
    """(n_layers, n_heads) effects of one trial; same semantics as the exact path."""
    dims, model = lm.dims, lm.model
    effect = torch.zeros(dims.n_layers, dims.n_heads)
    if not setup.last_slots:
        return effect  # nothing is patched, so nothing changes
    n_rows = dims.n_heads + 1  # one row per head, plus the unpatched row last
    inputs = setup.inputs
    clean_logits, cache = prefix_cache(model, inputs, n_rows)
    n_tokens = inputs["input_ids"].shape[1]
    last_ids = inputs["input_ids"][:, -1:].expand(n_rows, 1)
    mask = inputs["attention_mask"].expand(n_rows, n_tokens)
    for layer in range(dims.n_layers):
        o_proj = adapters.resolve_out_proj(model, lm.spec, layer)
        fn = head_patch(layer, setup.last_slots, mean_acts, dims.n_heads, dims.head_dim)
        with EditInput(o_proj, fn) as edit:
            out = model(input_ids=last_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        if edit.fired != 1:
            raise FvkitError(f"the patch on {adapters.out_proj_name(lm.spec, layer)} ran {edit.fired} times, expected once")
        logits = out.logits[:, -1, :]
        _check_clean_row(logits[-1], clean_logits, layer)
        if _is_cache_object(cache):
            cache.crop(-1)  # back to the clean prefix for the next layer
        probs = torch.softmax(logits, dim=-1)
        effect[layer] = probs[:-1, setup.target_id] - probs[-1, setup.target_id]
    return effect
