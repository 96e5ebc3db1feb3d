"""Evaluation from one clean pass per prompt: the clean answer, the vector at one layer or at every layer.

    res = cached_stage(lm, dataset, trials, "zero_shot", fv, layers=[6])
    res["clean_rank_list"], res["intervention_rank_lists"][0]   # ranks with the vector at layer 6
    res["near_ties"], res["near_tie_reruns"]                    # rank reads within float noise of a tie

The vector changes only the hidden state at the last position, and a causal
model's earlier positions never see the last one. So each prompt is run whole
once: its last-position logits are the clean answer, and its keys and values
(all positions but the last) are kept. The last token alone is then run again
on that prefix, one batch row per evaluated layer plus one clean row, with the
vector added to layer ``L``'s block output in ``L``'s row: in one model call
(:mod:`fvkit.fast.forward_rows`) where the model's cache object can answer from
the prefix, otherwise through the decoder blocks one by one
(:mod:`fvkit.fast.replay`; layer ``L``'s row joins at block ``L`` from the
clean run's input to that block, so nothing below an edited layer is
recomputed). One layer costs one prompt pass plus a one-token pass instead of
two prompt passes; every layer of the sweep comes from the same prompt pass.

The one-token rows compute the same numbers through differently shaped
attention products, so their logits differ from a whole-prompt pass by float32
rounding. That cannot move a rank unless another token's logit lies within that
noise of the target's (a *near tie*). ``ties="rerun"`` re-runs each such read as
:func:`fvkit.method.intervene.evaluate` computes it: from the edited block on, with
the clean pass's recorded block inputs (:mod:`fvkit.fast.prompt_rerun`, the same
numbers bit for bit), so the rank lists equal per-layer ``evaluate`` calls;
``ties="report"`` keeps the cached rank and only counts it. Both count the near
ties. The clean pass's record also gives the residual stream's norm at one layer
(``norm_layer``), which the vector-scale check needs.

A model whose blocks cannot be replayed one by one, or whose cache cannot be
cut, raises :class:`~fvkit.fast.replay.ReplayUnsupported` /
:class:`~fvkit.fast.cache.UnsupportedCache`; callers fall back to whole-prompt
passes.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional, Sequence

import torch

from fvkit.errors import FvkitError
from fvkit.fast.cache_names import output_cache
from fvkit.fast.cache import PrefixCache, UnsupportedCache, cache_length, drop_last
from fvkit.fast.forward_rows import NoCacheUpdate, check_clean_row as check_forward_clean_row, forward_rows
from fvkit.fast.indirect_effect import CAPTURE_ROWS, LM_HEAD_ROWS, _whole_blocks
from fvkit.fast.prompt_rerun import HEAD_POSITIONS, PromptRecord, exact_rerun
from fvkit.fast.replay import ReplayUnsupported, capture_last_token
from fvkit.method.intervene import edited_logits, last_position_logits, token_rank
from fvkit.method.run_defaults import TIE_POLICIES
from fvkit.method.stage_inputs import answer_ids, trial_prompt
from fvkit.models import adapters
from fvkit.models.placement import to_like
from fvkit.models.tracer import EditInput, first_tensor
from fvkit.progress import progress


#: How far the one-token rows' logits may be from a whole-prompt pass's, as a
#: multiple of the gap measured on the clean row of the same batch. Edited rows
#: go through the same kernels as the clean row; their largest gap was at most
#: 1.5x the clean row's on every tiny architecture and 2.7x on SmolLM2-135M
#: (30 layers), so 8x leaves a threefold margin over the worst seen.
TIE_NOISE_FACTOR = 8.0
#: Floor of that noise bound in float32 ulps of the row's largest |logit|, for
#: prompts whose clean row happens to agree bit for bit.
TIE_NOISE_ULPS = 4



#: model -> why its rows are replayed block by block (see :func:`edited_rows`).
_FORWARD_REFUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def noise_bound(logits: torch.Tensor, clean_gap: float) -> float:
    ulp = torch.finfo(torch.float32).eps * logits.abs().max().item()
    return max(TIE_NOISE_FACTOR * clean_gap, TIE_NOISE_ULPS * ulp)


def near_tie(logits: torch.Tensor, target: int, bound: float) -> bool:
    """Some other token's logit within twice the noise bound of the target's (both may move)."""
    row = logits.reshape(-1)
    close = (row - row[target]).abs() <= 2 * bound
    return int(close.sum().item()) > 1


def _last_positions(lm_head, n: int):
    """Let the output head read only the last ``n`` positions of every row."""
    return EditInput(lm_head, lambda x: x[:, -n:, :] if x.dim() == 3 else x)


def clean_pass(lm, inputs):
    """(clean last-position logits, a one-row prefix cache, the pass's :class:`PromptRecord`)
    from one whole-prompt pass."""
    model = lm.model
    head = adapters.resolve_lm_head(model, lm.spec)
    n_tokens = inputs["input_ids"].shape[1]
    with _last_positions(head, min(HEAD_POSITIONS, n_tokens)), PromptRecord(lm) as record:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=True)
    logits = last_position_logits(out)
    prefix = PrefixCache.from_output(output_cache(out), n_tokens)
    return logits, prefix, record


def edited_rows(lm, inputs, prefix: PrefixCache, vec: torch.Tensor, layers: Sequence[int],
                reuse: bool = True, clean_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Last-token logits with ``vec`` added to the output of block ``layers[i]`` in row ``i``;
    the last row is the clean recomputation (the guard's and the tie bound's point of comparison).
    ``reuse`` hands the prefix over (its final use).

    With ``clean_logits`` (the whole-prompt pass's), the rows come from one model call
    (:mod:`fvkit.fast.forward_rows`) where the model allows it: its clean row is checked on
    every call against ``clean_logits``; a model refused once (with a warning, unless its
    cache is a legacy tuple) is replayed block by block from then on."""
    model = lm.model
    if not bool(torch.any(vec != 0)):
        # Rows of one call round a little differently by their place in the batch, so an edited
        # row cannot show a zero vector by equalling the clean row; it is refused here instead.
        raise FvkitError(f"injecting the function vector at layer {layers[0]} did not change the output; "
                         f"the vector is zero or the edit was lost")
    if clean_logits is not None and model not in _FORWARD_REFUSED:
        try:
            # A copy of the prefix (one row, small): a refusal can still replay it.
            rows = forward_rows(lm, inputs, prefix, vec, layers, reuse=False)
            check_forward_clean_row(rows[-1], clean_logits)
        except (ReplayUnsupported, RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
            _FORWARD_REFUSED[model] = f"{type(err).__name__}: {err}"
            if not isinstance(err, NoCacheUpdate):
                warnings.warn(f"the cached evaluation cannot run this model's rows in one call ({err}); "
                              f"replaying its blocks one by one instead", stacklevel=2)
        else:
            return rows
    return replayed_rows(lm, inputs, prefix, vec, layers, reuse)


def forward_refusal(model) -> "str | None":
    """Why the cached evaluation replays ``model`` block by block instead of in one model call."""
    return _FORWARD_REFUSED.get(model)


def replayed_rows(lm, inputs, prefix: PrefixCache, vec: torch.Tensor, layers: Sequence[int],
                  reuse: bool = True) -> torch.Tensor:
    """:func:`edited_rows` by the block replay: a capture pass, then the blocks called one by one."""
    model, spec = lm.model, lm.spec
    blocks = adapters.resolve_blocks(model, spec)
    norm, head = adapters.resolve_final_norm(model, spec), adapters.resolve_lm_head(model, spec)
    calls = capture_last_token(model, blocks, inputs, prefix.take(CAPTURE_ROWS, reuse=reuse), CAPTURE_ROWS,
                               lm_head=head)
    try:
        return _replay_rows(calls, blocks, norm, head, vec, list(layers))
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
        # A block that cannot be called on its own with its recorded arguments: whole prompts instead.
        raise ReplayUnsupported(f"replaying the decoder blocks one by one failed ({type(err).__name__}: {err})") from err


def _replay_rows(calls, blocks, norm, head, vec: torch.Tensor, layers: list) -> torch.Tensor:
    n_layers = len(blocks)
    first = min(layers)
    row_of = {L: i for i, L in enumerate(layers)}
    hidden = None
    with calls.replaying():
        for layer in range(first, n_layers):
            joining = []
            if layer == first:
                joining.append(calls.hidden(layer)[:1])          # the clean row, kept as row 0 until the end
            if layer in row_of:
                joining.append(calls.hidden(layer)[:1])
            if joining:
                hidden = torch.cat(([hidden] if hidden is not None else []) + joining)
            n_rows = hidden.shape[0]
            hidden = first_tensor(calls.call_block(blocks, layer, _whole_blocks(hidden)))[:n_rows].clone()
            if layer in row_of:
                hidden[-1, -1] += to_like(vec, hidden)            # the row that joined at this block (its device and dtype)
        states = norm(hidden)[:, -1, :]
    logits = torch.cat([head(_whole_blocks(states[lo:lo + LM_HEAD_ROWS]))[:len(states[lo:lo + LM_HEAD_ROWS])]
                        for lo in range(0, states.shape[0], LM_HEAD_ROWS)])
    # Rows joined in layer order after the clean row 0: reorder to layers' order, clean last.
    order = sorted(row_of, key=lambda L: L)
    by_layer = {L: logits[1 + i] for i, L in enumerate(order)}
    return torch.stack([by_layer[L] for L in layers] + [logits[0]])


def item_ranks(lm, inputs, target: int, fv: torch.Tensor, layers: Sequence[int], ties: str,
               chunk: Optional[int] = None, norm_layer: Optional[int] = None) -> dict:
    """One prompt: clean rank, per-layer edited ranks and logit changes, cache gap, near ties, and
    with ``norm_layer`` the residual stream's norm there (:mod:`fvkit.method.vector_scale`).
    ``chunk`` caps the layers replayed together (all of them by default)."""
    vec = fv.reshape(lm.dims.hidden_size).to(lm.model.dtype)
    clean_logits, prefix, record = clean_pass(lm, inputs)
    rerun = lambda layer: exact_rerun(lm, record, inputs, layer, fv)  # noqa: E731
    chunk = len(layers) if chunk is None else max(1, int(chunk))
    ranks, changes, n_ties, reruns, gap = [], [], 0, 0, 0.0
    for start in range(0, len(layers), chunk):
        part = layers[start:start + chunk]
        rows = edited_rows(lm, inputs, prefix, vec, part, reuse=start + chunk >= len(layers), clean_logits=clean_logits)
        cached_clean = rows[-1]
        part_gap = (cached_clean - clean_logits[0]).abs().max().item()
        gap = max(gap, part_gap)
        for i, layer in enumerate(part):
            edited = rows[i:i + 1]
            item = _read_rank(rerun, target, layer, edited, cached_clean, clean_logits, part_gap, ties)
            ranks.append(item[0])
            changes.append(item[1])
            n_ties += item[2]
            reruns += item[3]
    return {"clean_rank": token_rank(clean_logits, target), "ranks": ranks, "changes": changes, "gap": gap,
            "near_ties": n_ties, "reruns": reruns,
            "residual_norm": None if norm_layer is None else record.output_norm(norm_layer)}


def _read_rank(rerun, target, layer, edited, cached_clean, clean_logits, gap, ties) -> tuple:
    """(rank, largest logit change, near tie 0/1, re-run 0/1) of one edited row; ``rerun(layer)``
    gives the row's logits as a whole-prompt pass with the vector computes them."""
    n_ties = reruns = 0
    if (edited - cached_clean).abs().max().item() == 0.0:
        raise FvkitError(f"injecting the function vector at layer {layer} did not change the output; "
                         f"the vector is zero or the edit was lost")
    if near_tie(edited, target, noise_bound(edited, gap)):
        n_ties += 1
        if ties == "rerun":
            edited = rerun(layer)
            reruns += 1
    return token_rank(edited, target), (edited - clean_logits).abs().max().item(), n_ties, reruns


def cached_stage(lm, dataset, trials, stage: str, fv: torch.Tensor, layers: Sequence[int], template,
                 n: int, ties: str = "rerun", chunk: Optional[int] = None, show_progress: bool = True,
                 desc: Optional[str] = None, norm_layer: Optional[int] = None) -> dict:
    """Clean ranks and, per layer of ``layers``, edited ranks of the first ``n`` items of ``stage``;
    with ``norm_layer``, also each prompt's residual-stream norm there, from the same clean pass."""
    if ties not in TIE_POLICIES:
        raise FvkitError(f"unknown near-tie policy '{ties}'; use one of {', '.join(TIE_POLICIES)}")
    layers = list(layers)
    if not layers:
        raise FvkitError("cached evaluation needs at least one layer")
    clean, edited, changes = [], [[] for _ in layers], [0.0] * len(layers)
    gap, n_ties, reruns, norms = 0.0, 0, 0, []
    with torch.no_grad():
        for j in progress(range(n), desc=desc or f"eval {stage}", enabled=show_progress):
            data, text = trial_prompt(lm, dataset, trials, stage, j, template)
            target = answer_ids(lm.tokenizer, text, data["query_target"]["output"])[0]
            inputs = lm.tokenizer([text], return_tensors="pt")
            item = item_ranks(lm, inputs, target, fv, layers, ties, chunk, norm_layer)
            clean.append(item["clean_rank"])
            norms.append(item["residual_norm"])
            for i in range(len(layers)):
                edited[i].append(item["ranks"][i])
                changes[i] = max(changes[i], item["changes"][i])
            gap = max(gap, item["gap"])
            n_ties += item["near_ties"]
            reruns += item["reruns"]
    return {"clean_rank_list": clean, "intervention_rank_lists": edited, "max_abs_logit_change": changes,
            "cached_clean_max_abs_diff": gap, "near_ties": n_ties, "near_tie_reruns": reruns,
            **({"residual_norms": norms} if norm_layer is not None else {})}


#: What makes a model unable to use the cached evaluation (callers fall back to whole prompts).
CACHE_REFUSALS = (UnsupportedCache, ReplayUnsupported)


def baseline_item(lm, prompt_inputs, full_inputs, labels, target: int, fv: Optional[torch.Tensor],
                  layer: Optional[int], ties: str) -> dict:
    """The clean few-shot item as :func:`fvkit.method.intervene.evaluate_baseline` computes it (one
    pass over prompt + answer: its loss and the logits before the answer, the same numbers from the
    output head on the last positions only), and, with ``fv``, the
    rank with the vector at ``layer`` from the same pass's keys and values of the prompt."""
    model = lm.model
    prompt_len = prompt_inputs["input_ids"].shape[1]
    n_tokens = full_inputs["input_ids"].shape[1]
    # Only the positions before each answer token are read: the output head computes those
    # (and enough before them to round as over the whole sequence, see HEAD_POSITIONS), and
    # the loss is taken over them as the model's own loss takes it over the unmasked labels.
    first = n_tokens - min(n_tokens, max(HEAD_POSITIONS, n_tokens - prompt_len + 1))
    with _last_positions(adapters.resolve_lm_head(model, lm.spec), n_tokens - first):
        out = model(**full_inputs, use_cache=fv is not None)
    before_answer = out.logits[0, prompt_len - 1 - first:n_tokens - 1 - first]
    clean_logits = before_answer[:1].clone()
    nll = torch.nn.functional.cross_entropy(before_answer.float(), labels[0, prompt_len:].to(before_answer.device))
    item = {"clean_rank": token_rank(clean_logits, target), "nll": nll.item()}
    if fv is None:
        return item
    cache = output_cache(out)
    del out, before_answer  # not kept through the next pass
    if prompt_len < 2 or cache_length(cache) != n_tokens:
        raise UnsupportedCache(f"the few-shot pass's cache holds {cache_length(cache)} positions, expected {n_tokens}")
    prefix = PrefixCache(drop_last(cache, n_tokens - prompt_len + 1), prompt_len - 1)
    if cache_length(prefix._cache) != prompt_len - 1:
        raise UnsupportedCache(f"{type(cache).__name__} did not crop to the prompt's {prompt_len - 1} positions")
    vec = fv.reshape(lm.dims.hidden_size).to(model.dtype)
    rows = edited_rows(lm, prompt_inputs, prefix, vec, [layer], clean_logits=clean_logits)
    gap = (rows[-1] - clean_logits[0]).abs().max().item()
    rank, change, n_ties, reruns = _read_rank(lambda L: edited_logits(lm, prompt_inputs, L, fv), target, layer,
                                              rows[:1], rows[-1], clean_logits, gap, ties)
    return {**item, "rank": rank, "change": change, "gap": gap, "near_ties": n_ties, "reruns": reruns}
