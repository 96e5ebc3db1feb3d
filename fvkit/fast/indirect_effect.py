"""Indirect effect of every head, recomputing only the last position.

    effect = fast_trial(lm, setup, mean_acts)      # (n_layers, n_heads), as the exact path computes
    drift = relative_drift(fast_ie, exact_ie)      # agreement: drift <= FAST_VS_EXACT_REL_TOL

The patch changes one head's out-projection input at the last token only.
Attention is causal, so every earlier position computes, at every layer,
exactly what it computed in the clean run. Their keys and values are therefore
taken once from the clean run (:mod:`fvkit.fast.replay`) and only the last token
is computed again, for all heads of a layer at once: batch row ``h`` patches
head ``h``, and the row after the last head stays unpatched.

Three strategies compute the same numbers:

* ``merged``: the rows ride in the prompt's own pass, as positions after the
  prompt's (:mod:`fvkit.fast.merged_pass`): each block multiplies the prompt's
  positions and the rows that reached it in one product, so each layer's weights
  are read once per trial. A layer's rows join at its block, as below.
* ``blocks``: the decoder blocks are called one by one, as the model called
  them for the last token, followed by the spec's final norm and output head.
  A layer's rows join the batch at that layer's block, so nothing below a
  patched layer is recomputed, each block runs once for all layers above it,
  and the output head runs once for all rows. How the model calls each block
  for the last token is cut from its calls in the clean run (the last row of
  every argument that spans the prompt, :func:`~fvkit.fast.replay.prompt_block_calls`);
  a model whose block arguments cannot be cut so has them recorded by a
  one-token capture pass instead.
* ``model``: the last token goes through the model's own ``forward`` once per
  layer, on the cached prefix. Slower, but it assumes nothing beyond the cache.

``auto`` uses ``merged`` unless a model's blocks or attention cannot be extended
to the rows (GPT-2's blocks take their mask positionally) or one pass would hold
more rows than the memory budget allows; it is then refused for that model and
``blocks`` used. ``blocks`` in turn is refused where a model's forward does more
than its blocks, final norm and head, and ``model`` used. Measured on
SmolLM2-135M (one core, three runs each): ``merged`` 7.3-7.5 s for the ten
trials of present-past, ``blocks`` 8.1-8.4 s, the same effects to 1.7e-6 of the
largest.

The unpatched row does two jobs. Its probabilities are the baseline each
effect is measured against, so rounding that the single-token path adds is
common to both sides of the difference. And its logits are compared with the
clean full-prompt run's, so a cache, position or mask that the model did not
take as intended stops the run instead of producing plausible wrong effects.
``model`` runs one per layer; ``blocks`` one per pass, joining with the pass's
first layer and going through every block above (a row per layer was a tenth
of a SmolLM2-135M trial's work; fast-vs-exact drift stayed 0.8-6.5e-6 on the
zoo models, SmolLM2-135M and gemma3-270m either way).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch

from fvkit.fast.cache_names import cache_kwargs
from fvkit.models import adapters
from fvkit.errors import FvkitError
from fvkit.method.head_effect import check_patch_fired, effect, head_patch, target_probs
from fvkit.fast.cache import drop_last, is_cache_object
from fvkit.fast.relative_drift import relative_drift  # noqa: F401  (this module's agreement measure)
from fvkit.fast.merged_pass import merged_rows, prompt_logits
from fvkit.fast.replay import (ReplayUnsupported, capture_last_token, clean_prefix, last_token_inputs,
                               prompt_block_calls)
from fvkit.models.tracer import EditInput, first_tensor

#: Fast and exact effects agree when no entry differs by more than this fraction
#: of the largest absolute exact effect. Both compute the same quantity in
#: float32 (in float64 they agree to 1e-12); they differ only in how attention's
#: products are shaped (a full prompt against one cached token), which moves
#: logits by a few float32 ulps. That is the float32 noise floor of the quantity
#: itself: the exact path (and the reference, bit for bit) is 1-9e-6 of the
#: largest effect away from a float64 computation on the zoo models, GPT-2-small
#: and SmolLM2-135M, and fast-vs-exact drift measures 1-8.5e-6 there. A patch at
#: the wrong head, row or position moves effects by their own size (drift ~1).
FAST_VS_EXACT_REL_TOL = 1e-5

#: The unpatched row must reproduce the clean run's last-token logits to within
#: this fraction of their largest magnitude. Rounding gives ~1e-6; a wrong
#: position, mask or cache, or a forward pass that does more than its blocks,
#: is off by O(1).
CLEAN_ROW_REL_TOL = 1e-4
#: ... or this many of the logits' own epsilon, where that is more. In bfloat16 the
#: one-token path's rounding alone reaches the epsilon (7.8e-3): 7.6e-3 and 9.1e-3 of
#: the scale measured on SmolLM2-135M, on a CPU with bfloat16 dot-product instructions.
#: Four epsilons (3.1e-2) still leave the O(1) of a wrong position or cache far outside.
CLEAN_ROW_EPS_MULTIPLE = 4

#: Every batched matrix product gets a multiple of this many rows. On one CPU seen
#: here the BLAS kernels process rows in blocks of four, and rows of a partial block
#: take another code path that rounds differently, so without padding a row's result
#: would depend on the head count and the number of threads. (On an AVX-512 CPU the
#: classes are 1, 2-15 and 16 or more rows instead, see prompt_rerun.HEAD_POSITIONS;
#: a multiple of four never falls in the one-row class there.) Padded rows are
#: unpatched copies whose results are dropped.
BATCH_ROW_MULTIPLE = 4

#: Rows of the run that records how the model calls its blocks. Any number
#: above one tells batch-sized tensors apart from the rest; a whole block of rows
#: keeps the recorded states on the kernels the other steps use.
CAPTURE_ROWS = BATCH_ROW_MULTIPLE

#: Rows per output-head call in the ``blocks`` strategy, at most: large enough for an
#: efficient matrix product, small enough that one call's logits stay near 30 megabytes
#: for a 50k-token vocabulary. The rows are split into calls of equal size: on
#: SmolLM2-135M's head (49k tokens, one core) a row cost 0.51 ms in a call of 44 rows,
#: 0.36 ms in one of 128, 0.31-0.32 ms in one of 150-160 and 0.42 ms in one of 192.
LM_HEAD_ROWS = 160

#: Rows per target-probability call: each row's softmax is the same in any slice, and 16 rows of
#: a 50k-token vocabulary (3 MB) stay in a core's caches through the softmax's passes over them
#: (SmolLM2-135M, one core: 66 ms of target probabilities per trial in 128-row slices, 38 ms in
#: 16-row ones, the same bits).
SOFTMAX_ROWS = 16

#: Rows of the ``blocks`` strategy in flight at once are limited so that what
#: attention holds for all of them takes at most this fraction of the model's
#: weight memory (but at least PASS_MEMORY_FLOOR_BYTES); layers beyond the limit
#: go into further passes. More rows per pass means fewer passes over the weights
#: and larger, more efficient matrix products.
PASS_MEMORY_FRACTION = 1 / 8
PASS_MEMORY_FLOOR_BYTES = 32 * 2**20
#: ... and to at most this many rows: beyond a few hundred rows matrix products
#: gain nothing more, while a large model's attention memory keeps growing. (Every
#: pass's first blocks run on few rows; SmolLM2-135M's 30 layers of 10 rows fit one.)
PASS_MAX_ROWS = 320

STRATEGIES = ("auto", "merged", "blocks", "model")

#: model -> why its blocks' last-token calls cannot be cut from the whole-prompt pass
#: (:func:`~fvkit.fast.replay.prompt_block_calls`); a capture pass records them instead.
_PROMPT_CALLS_REFUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

#: model -> the ReplayUnsupported that made ``auto`` give up the ``merged`` strategy (it then uses ``blocks``).
_MERGED_REFUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

#: models whose prompt logits from a merged pass were seen equal to a pass's without rows.
_MERGED_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

#: model -> why the ``blocks`` strategy does not fit it (``auto`` then uses ``model``).
_BLOCKS_REFUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def batch_rows(n_heads: int) -> int:
    """Rows per layer: one per head, one unpatched, padded (see BATCH_ROW_MULTIPLE)."""
    return -(-(n_heads + 1) // BATCH_ROW_MULTIPLE) * BATCH_ROW_MULTIPLE


def clean_row_drift(logits: torch.Tensor, clean_logits: torch.Tensor) -> tuple:
    """(drift, allowed): how far a recomputed clean row's logits are from the clean run's, as a
    fraction of their scale, and the bound they must keep (CLEAN_ROW_REL_TOL, CLEAN_ROW_EPS_MULTIPLE)."""
    clean_logits = clean_logits.reshape(logits.shape).to(logits.device)  # the head may run elsewhere than the output lands
    scale = float(clean_logits.abs().max().clamp_min(1.0))
    drift = float((logits - clean_logits).abs().max()) / scale
    return drift, max(CLEAN_ROW_REL_TOL, CLEAN_ROW_EPS_MULTIPLE * torch.finfo(logits.dtype).eps)


def check_clean_row(logits: torch.Tensor, clean_logits: torch.Tensor, layer: int, strategy: str) -> None:
    drift, allowed = clean_row_drift(logits, clean_logits)
    if not drift <= allowed:
        raise ReplayUnsupported(
            f"fast indirect effect ({strategy}): at layer {layer} the unpatched row's logits differ from the "
            f"clean run's by {drift:.2e} of their scale (allowed {allowed:.1e}); this model's "
            f"last-token recomputation does not reproduce its forward pass"
        )


def layers_per_pass(lm, n_tokens: int, rows: int, prefix_copies: bool = True) -> int:
    """How many layers' rows one pass of the ``blocks`` strategy carries (see PASS_MEMORY_FRACTION).

    With ``prefix_copies`` each row's attention holds keys and values over the whole prompt;
    without, only its scores and weights over it (the shared-prefix attention reads one copy
    of the prefix for all rows, :func:`~fvkit.fast.replay.BlockCalls.placeholders_everywhere`)."""
    dims = lm.dims
    param_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    budget = max(PASS_MEMORY_FLOOR_BYTES, int(param_bytes * PASS_MEMORY_FRACTION))
    item = next(lm.model.parameters()).element_size()
    per_head = dims.head_dim if prefix_copies else 1
    row_bytes = 4 * n_tokens * dims.n_heads * per_head * item
    return max(1, min(dims.n_layers, budget // (row_bytes * rows), PASS_MAX_ROWS // rows))


def _whole_blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` with copies of its first row appended up to a multiple of BATCH_ROW_MULTIPLE rows."""
    pad = -x.shape[0] % BATCH_ROW_MULTIPLE
    return torch.cat([x, x[:1].expand(pad, *x.shape[1:])]) if pad else x


def _run_pass(lm, calls, blocks, setup, mean_acts, first: int, last: int) -> torch.Tensor:
    """Final hidden states (before the norm) of the pass's unpatched row, then one row per head of
    each of layers ``first..last-1``.

    Layer ``L``'s rows join the batch at block ``L``, so nothing below a patched layer
    is computed and every block above runs once for all of them. The unpatched row joins
    with the first layer's.
    """
    dims, model, spec = lm.dims, lm.model, lm.spec
    hidden = None
    for layer in range(first, dims.n_layers):
        edit = contextlib.nullcontext()
        if layer < last:
            clean = calls.hidden(layer)[:1]
            joining = dims.n_heads + (layer == first)
            clean = clean.expand(joining, *clean.shape[1:])
            # Under a device map the previous block may have run on another device.
            hidden = clean if hidden is None else torch.cat([hidden.to(clean.device), clean])
            patch = head_patch(mean_acts, layer, setup.last_slots, dims.n_heads, dims.head_dim,
                               first_row=1 + (layer - first) * dims.n_heads)
            edit = EditInput(adapters.resolve_out_proj(model, spec, layer), patch)
        n_rows = hidden.shape[0]
        with edit:
            hidden = first_tensor(calls.call_block(blocks, layer, _whole_blocks(hidden)))[:n_rows]
        if layer < last:
            check_patch_fired(edit, lm, layer)
    return hidden


def blocks_trial(lm, setup, mean_acts: torch.Tensor) -> torch.Tensor:
    """``blocks`` strategy (see module docstring)."""
    dims, model, spec = lm.dims, lm.model, lm.spec
    n_layers, n_heads = dims.n_layers, dims.n_heads
    group = n_heads + 1  # rows per layer for the memory budget: one per head, and a pass's unpatched row
    blocks = adapters.resolve_blocks(model, spec)
    norm, head = adapters.resolve_final_norm(model, spec), adapters.resolve_lm_head(model, spec)
    calls = None
    if model not in _PROMPT_CALLS_REFUSED:
        try:
            clean_logits, calls = prompt_block_calls(model, blocks, setup.inputs, CAPTURE_ROWS, lm_head=head)
        except ReplayUnsupported as err:
            _PROMPT_CALLS_REFUSED[model] = str(err)
    try:
        if calls is None:
            clean_logits, cache = clean_prefix(model, setup.inputs, CAPTURE_ROWS, lm_head=head)
            calls = capture_last_token(model, blocks, setup.inputs, cache, CAPTURE_ROWS, lm_head=head)
            del cache  # the recorded calls keep what the replay needs
        with calls.replaying():
            calls.learn_attending()
            step = layers_per_pass(lm, setup.inputs["input_ids"].shape[1], group,
                                   prefix_copies=not calls.placeholders_everywhere())
            finals = [norm(_run_pass(lm, calls, blocks, setup, mean_acts, first, min(first + step, n_layers)))
                      for first in range(0, n_layers, step)]
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
        # A block that cannot be called on its own with its recorded arguments (other shapes,
        # state kept outside the cache): this model needs the whole-model strategy.
        raise ReplayUnsupported(f"replaying the decoder blocks one by one failed ({type(err).__name__}: {err})") from err
    return _effects(lm, setup, finals, clean_logits, step, "blocks")


class RowsDisagree(ReplayUnsupported):
    """The merged pass ran, but did not reproduce a pass without rows: its unpatched row's logits,
    or the prompt's own, are not the clean run's. Unlike a block it cannot extend, this may be a
    fault of fvkit's own, which the ``blocks`` fallback's right numbers would hide (see the parity
    suite's gate M3)."""


def merged_trial(lm, setup, mean_acts: torch.Tensor) -> torch.Tensor:
    """``merged`` strategy (see module docstring and :mod:`fvkit.fast.merged_pass`)."""
    dims, model, spec = lm.dims, lm.model, lm.spec
    norm, head = adapters.resolve_final_norm(model, spec), adapters.resolve_lm_head(model, spec)
    n_tokens = setup.inputs["input_ids"].shape[1]
    if layers_per_pass(lm, n_tokens, dims.n_heads + 1, prefix_copies=False) < dims.n_layers:
        raise ReplayUnsupported("one pass cannot carry every layer's rows within the memory budget")
    try:
        clean_logits, rows, edits = merged_rows(lm, setup, mean_acts, head, BATCH_ROW_MULTIPLE)
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
        raise ReplayUnsupported(f"carrying the rows in the prompt's pass failed ({type(err).__name__}: {err})") from err
    for layer, edit in enumerate(edits):
        check_patch_fired(edit, lm, layer)
    try:
        if model not in _MERGED_CHECKED:
            drift, allowed = clean_row_drift(clean_logits, prompt_logits(model, setup.inputs, head))
            if not drift <= allowed:
                raise ReplayUnsupported(f"with the rows carried along, the prompt's logits differ from its pass alone "
                                        f"by {drift:.2e} of their scale (allowed {allowed:.1e}): the model mixes "
                                        f"positions outside attention")
            _MERGED_CHECKED[model] = True
        return _effects(lm, setup, [norm(rows[0].unsqueeze(1))], clean_logits, dims.n_layers, "merged")
    except ReplayUnsupported as err:
        raise RowsDisagree(str(err)) from None


def _effects(lm, setup, finals: list, clean_logits: torch.Tensor, step: int, strategy: str) -> torch.Tensor:
    """(n_layers, n_heads) effects from each pass's final rows after the norm (``(rows, 1, hidden)``:
    its unpatched row, then a row per head of each of its ``step`` layers)."""
    head, n_heads = adapters.resolve_lm_head(lm.model, lm.spec), lm.dims.n_heads
    states = torch.cat(finals)[:, -1, :]
    # Each pass's rows: its unpatched row, then its layers' rows, a row per head.
    sizes = [rows.shape[0] for rows in finals]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    probs = []
    n_calls = -(-states.shape[0] // LM_HEAD_ROWS)
    per_call = -(-states.shape[0] // n_calls)  # calls of equal size, none above LM_HEAD_ROWS
    for lo in range(0, states.shape[0], per_call):
        chunk = states[lo:lo + per_call]
        logits = head(_whole_blocks(chunk))[:chunk.shape[0]]
        for k, start in enumerate(starts):
            if lo <= start < lo + chunk.shape[0]:  # pass k's unpatched row, which joined at layer k * step
                check_clean_row(logits[start - lo], clean_logits, k * step, strategy)
        # Row by row the same softmax; in slices the logits stay in the CPU's caches between its passes.
        probs += [target_probs(logits[r:r + SOFTMAX_ROWS], setup.target_id, overwrite=True)
                  for r in range(0, logits.shape[0], SOFTMAX_ROWS)]
    probs = torch.cat(probs)
    effects = [effect(probs[start + 1:start + size].view(-1, n_heads), probs[start]) for start, size in zip(starts, sizes)]
    return torch.cat(effects).to(torch.float32)  # stored as the exact path stores it


def model_trial(lm, setup, mean_acts: torch.Tensor) -> torch.Tensor:
    """``model`` strategy (see module docstring)."""
    dims, model, spec = lm.dims, lm.model, lm.spec
    n_heads, rows = dims.n_heads, batch_rows(dims.n_heads)
    head = adapters.resolve_lm_head(model, spec)
    clean_logits, cache = clean_prefix(model, setup.inputs, rows, lm_head=head)
    step_inputs = last_token_inputs(setup.inputs, rows)
    effects = torch.zeros(dims.n_layers, n_heads)
    for layer in range(dims.n_layers):
        o_proj = adapters.resolve_out_proj(model, spec, layer)
        with EditInput(o_proj, head_patch(mean_acts, layer, setup.last_slots, n_heads, dims.head_dim)) as edit:
            logits = model(**step_inputs, **cache_kwargs(model, cache), use_cache=True).logits[:, -1, :]
        check_patch_fired(edit, lm, layer)
        # The step appended the last token to every layer of a cache object (a legacy
        # tuple is never modified in place); the next layer needs the clean prefix again.
        if is_cache_object(cache):
            drop_last(cache, 1)
        try:
            check_clean_row(logits[n_heads], clean_logits, layer, "model")
        except ReplayUnsupported as err:
            raise FvkitError(f"{err}; run with --ie-mode exact") from None
        probs = target_probs(logits, setup.target_id)
        effects[layer] = effect(probs[:n_heads], probs[n_heads])
    return effects


def merged_refusal(model) -> "str | None":
    """Why ``auto`` gave up the ``merged`` strategy for ``model`` (None when it did not)."""
    err = _MERGED_REFUSED.get(model)
    return None if err is None else str(err)


def merged_disagreement(model) -> "str | None":
    """Why ``auto`` gave up the ``merged`` strategy for ``model`` when the pass ran but did not reproduce
    the clean run (:class:`RowsDisagree`); None when it was not given up, or for a block it cannot extend."""
    err = _MERGED_REFUSED.get(model)
    return str(err) if isinstance(err, RowsDisagree) else None


def blocks_refusal(model) -> "str | None":
    """Why ``auto`` gave up the ``blocks`` strategy for ``model`` and used ``model`` instead
    (None when it did not). The parity suite fails on it (gate M3): a block replay that
    does not reproduce the clean run may be a stale or misplaced row of fvkit's own, which
    the fallback's right numbers would otherwise hide."""
    return _BLOCKS_REFUSED.get(model)


def fast_trial(lm, setup, mean_acts: torch.Tensor, strategy: str = "auto") -> torch.Tensor:
    """(n_layers, n_heads) effects of one trial, with the exact path's semantics."""
    if strategy not in STRATEGIES:
        raise FvkitError(f"unknown fast indirect-effect strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
    if not setup.last_slots:
        return torch.zeros(lm.dims.n_layers, lm.dims.n_heads)  # nothing is patched, nothing changes
    # Nothing a trial makes outlives it but its effects, so none of its tensors needs autograd's
    # version counters (2.4% of a SmolLM2-135M trial, the same bits); the effects are cloned
    # outside, into an ordinary tensor the caller may change in place.
    with torch.inference_mode():
        effects = _strategy_trial(lm, setup, mean_acts, strategy)
    return effects.clone()


def _strategy_trial(lm, setup, mean_acts: torch.Tensor, strategy: str) -> torch.Tensor:
    if strategy in ("auto", "merged") and lm.model not in _MERGED_REFUSED:
        try:
            return merged_trial(lm, setup, mean_acts)
        except ReplayUnsupported as err:
            if strategy == "merged":
                raise
            # A slower strategy computes the same (see merged_refusal). A copy without the traceback,
            # whose frames would keep the failed pass's tensors alive as long as the model.
            _MERGED_REFUSED[lm.model] = type(err)(str(err))
    if strategy == "merged":
        refused = _MERGED_REFUSED[lm.model]
        raise type(refused)(str(refused))  # a fresh one: raising the stored one would give it a traceback
    if strategy == "model" or (strategy == "auto" and lm.model in _BLOCKS_REFUSED):
        return model_trial(lm, setup, mean_acts)
    try:
        return blocks_trial(lm, setup, mean_acts)
    except ReplayUnsupported as err:
        if strategy == "blocks":
            raise
        _BLOCKS_REFUSED[lm.model] = str(err)
        warnings.warn(f"{err}; recomputing the last token through the whole model instead", stacklevel=3)
        return model_trial(lm, setup, mean_acts)
