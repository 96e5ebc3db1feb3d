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
for a few prompts together (:class:`PromptGroups`, :mod:`fvkit.fast.forward_rows`)
where the model's cache object can answer from the prefix, otherwise through
the decoder blocks one by one (:mod:`fvkit.fast.replay`; layer ``L``'s row joins at block ``L`` from the
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
from fvkit.fast.forward_rows import NoCacheUpdate, check_clean_row as check_forward_clean_row, group_rows
from fvkit.fast.indirect_effect import CAPTURE_ROWS, LM_HEAD_ROWS, _whole_blocks
from fvkit.fast.prompt_rerun import HEAD_POSITIONS, PromptRecord, check_short_head, exact_rerun, head_positions
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
#: go through the same kernels as the clean row. A rank moves only if the target's
#: error and another token's differ by their logits' distance; on SmolLM2-135M
#: (64 prompts x 30 layers, rows of four prompts per call) that difference was at
#: most 3.3x the clean row's gap (99th percentile 1.9x), and a single logit's error
#: at most 2.9x (1.5x on every tiny architecture). A read is re-run when another
#: logit lies within twice this bound of the target's: 8x the gap, a 2.4-fold
#: margin over the worst difference seen. (Twice that window re-ran 36% more reads,
#: most of them targets thousands of ranks down, where logits lie densely.)
TIE_NOISE_FACTOR = 4.0
#: Floor of that noise bound in float32 ulps of the row's largest |logit|, for
#: prompts whose clean row happens to agree bit for bit.
TIE_NOISE_ULPS = 4



#: Most prompts whose edited rows share one model call. A one-token pass over
#: SmolLM2-135M's 30 layers costs 0.17 s for one prompt's 31 rows, 0.39 s for four
#: prompts' and 0.65 s for eight (reading and packing the weights dominates it).
MAX_PROMPTS_PER_CALL = 8
#: What the prompts of one call may hold at once, as a fraction of the model's weights:
#: each prompt's clean-pass record (every block's output, for exact re-runs), its keys and
#: values, and its rows' logits. A 99-token SmolLM2-135M prompt holds 17.5 MB with its 31
#: rows, a 7-token one 6.9 MB; a tenth of the weights (51 MB) lets two such long
#: prompts or seven short ones share a call. Measured alone, the shuffled-label sweep's
#: working set was then 78 MB (22 MB one prompt at a time, 121 MB four at a time), below
#: the rest of a run's peak: the whole run's stayed at 95 MB (99 MB before grouping).
GROUP_MEMORY_FRACTION = 0.1


def held_bytes(lm, n_tokens: int, n_rows: int, record: bool = True) -> int:
    """Memory one prompt holds while its group's rows run (see GROUP_MEMORY_FRACTION)."""
    d = lm.dims
    size = torch.empty((), dtype=lm.model.dtype).element_size()
    per_position = 2 * d.n_kv_heads * d.head_dim + (d.hidden_size if record else 0)
    return size * (d.n_layers * n_tokens * per_position + n_rows * d.vocab_size)


def group_budget(lm) -> int:
    """Bytes the prompts of one rows call may hold together (GROUP_MEMORY_FRACTION of the weights)."""
    return int(GROUP_MEMORY_FRACTION * sum(p.numel() * p.element_size() for p in lm.model.parameters()))


class PromptGroups:
    """Prompts gathered into groups that share one rows call, within the memory budget.

        groups = PromptGroups(lm, n_rows=31, run=handle)
        for prompt in prompts:
            groups.add(prompt, n_tokens)     # runs handle(group) first when this one would not fit
        groups.flush()
    """

    def __init__(self, lm, n_rows: int, run, record: bool = True, budget: Optional[int] = None):
        self.lm, self.n_rows, self.run, self.record = lm, n_rows, run, record
        self.budget = group_budget(lm) if budget is None else budget
        self.items, self.held = [], 0

    def add(self, item, n_tokens: int) -> None:
        need = held_bytes(self.lm, n_tokens, self.n_rows, self.record)
        if self.items and (self.held + need > self.budget or len(self.items) >= MAX_PROMPTS_PER_CALL):
            self.flush()
        self.items.append(item)
        self.held += need

    def flush(self) -> None:
        if self.items:
            items, self.items, self.held = self.items, [], 0
            self.run(items)


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


def _last_positions(lm_head, n: int, seen: Optional[list] = None):
    """Let the output head read only the last ``n`` positions of every row (appending its whole
    input to ``seen``, where given)."""
    def cut(x):
        if x.dim() != 3:
            return x
        if seen is not None:
            seen.append(x)
        return x[:, -n:, :]

    return EditInput(lm_head, cut)


def clean_pass(lm, inputs):
    """(clean last-position logits, a one-row prefix cache, the pass's :class:`PromptRecord`)
    from one whole-prompt pass."""
    model = lm.model
    head = adapters.resolve_lm_head(model, lm.spec)
    n_tokens = inputs["input_ids"].shape[1]
    n = head_positions(model, n_tokens)
    head_input = [] if n == n_tokens else None  # all positions read: a short prompt's head is checked on them
    with _last_positions(head, n, seen=head_input), PromptRecord(lm) as record:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=True)
    logits = last_position_logits(out)
    if head_input:
        check_short_head(model, head, head_input.pop(), logits)
    prefix = PrefixCache.from_output(output_cache(out), n_tokens)
    return logits, prefix, record


def edited_rows(lm, inputs, prefix: PrefixCache, vec: torch.Tensor, layers: Sequence[int],
                reuse: bool = True, clean_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Last-token logits with ``vec`` added to the output of block ``layers[i]`` in row ``i``;
    the last row is the clean recomputation (the guard's and the tie bound's point of comparison).
    ``reuse`` hands the prefix over (its final use). One prompt of :func:`group_edited_rows`."""
    return group_edited_rows(lm, [(inputs, prefix, clean_logits)], vec, layers, reuse)[0]


def group_edited_rows(lm, items, vec: torch.Tensor, layers: Sequence[int], reuse: bool = True) -> list:
    """:func:`edited_rows` of several prompts, ``items`` being (inputs, prefix, clean logits or None).

    With every prompt's ``clean_logits`` (the whole-prompt pass's), the rows come from one model
    call for all of them (:mod:`fvkit.fast.forward_rows`) where the model allows it: each prompt's
    clean row is checked on every call against its ``clean_logits``; a model refused once (with a
    warning, unless its cache is a legacy tuple) is replayed block by block, prompt by prompt, from
    then on."""
    model = lm.model
    if not bool(torch.any(vec != 0)):
        # Rows of one call round a little differently by their place in the batch, so an edited
        # row cannot show a zero vector by equalling the clean row; it is refused here instead.
        raise FvkitError(f"injecting the function vector at layer {layers[0]} did not change the output; "
                         f"the vector is zero or the edit was lost")
    if all(clean is not None for *_, clean in items) and model not in _FORWARD_REFUSED:
        try:
            rows = group_rows(lm, [(inputs, prefix) for inputs, prefix, _ in items], vec, layers)
            for item_rows, (*_, clean) in zip(rows, items):
                check_forward_clean_row(item_rows[-1], clean)
        except (ReplayUnsupported, RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
            _FORWARD_REFUSED[model] = f"{type(err).__name__}: {err}"
            if not isinstance(err, NoCacheUpdate):
                warnings.warn(f"the cached evaluation cannot run this model's rows in one call ({err}); "
                              f"replaying its blocks one by one instead", stacklevel=2)
        else:
            return rows
    return [replayed_rows(lm, inputs, prefix, vec, layers, reuse) for inputs, prefix, _ in items]


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


def group_ranks(lm, prompts, fv: torch.Tensor, layers: Sequence[int], ties: str,
                chunk: Optional[int] = None, norm_layer: Optional[int] = None) -> list:
    """Per prompt of ``prompts`` ((inputs, target token) each): clean rank, per-layer edited ranks
    and logit changes, cache gap, near ties, and with ``norm_layer`` the residual stream's norm
    there (:mod:`fvkit.method.vector_scale`). Each prompt has its own clean pass; their edited rows
    run together. ``chunk`` caps the layers replayed together (all of them by default)."""
    vec = fv.reshape(lm.dims.hidden_size).to(lm.model.dtype)
    passes = [clean_pass(lm, inputs) for inputs, _ in prompts]   # (clean logits, prefix, record) each
    chunk = len(layers) if chunk is None else max(1, int(chunk))
    found = [{"ranks": [], "changes": [], "gap": 0.0, "near_ties": 0, "reruns": 0} for _ in prompts]
    for start in range(0, len(layers), chunk):
        part = layers[start:start + chunk]
        rows = group_edited_rows(lm, [(inputs, prefix, clean) for (inputs, _), (clean, prefix, _) in zip(prompts, passes)],
                                 vec, part, reuse=start + chunk >= len(layers))
        for (inputs, target), (clean, _, record), item_rows, item in zip(prompts, passes, rows, found):
            cached_clean = item_rows[-1]
            part_gap = (cached_clean - clean[0]).abs().max().item()
            item["gap"] = max(item["gap"], part_gap)
            rerun = lambda layer, inputs=inputs, record=record: exact_rerun(lm, record, inputs, layer, fv)  # noqa: E731
            for i, layer in enumerate(part):
                rank, change, n_ties, reruns = _read_rank(rerun, target, layer, item_rows[i:i + 1], cached_clean,
                                                          clean, part_gap, ties)
                item["ranks"].append(rank)
                item["changes"].append(change)
                item["near_ties"] += n_ties
                item["reruns"] += reruns
        del rows  # one chunk's logits at a time
    return [{**item, "clean_rank": token_rank(clean, target),
             "residual_norm": None if norm_layer is None else record.output_norm(norm_layer)}
            for (_, target), (clean, _, record), item in zip(prompts, passes, found)]


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
            # A dispatched model's re-run ends in the output head on its execution device; the
            # clean logits came back from the model's forward, on its input's device.
            edited = rerun(layer).to(clean_logits.device)
            reruns += 1
    return token_rank(edited, target), (edited - clean_logits).abs().max().item(), n_ties, reruns


def cached_stage(lm, dataset, trials, stage: str, fv: torch.Tensor, layers: Sequence[int], template,
                 n: int, ties: str = "rerun", chunk: Optional[int] = None, show_progress: bool = True,
                 desc: Optional[str] = None, norm_layer: Optional[int] = None,
                 budget: Optional[int] = None) -> dict:
    """Clean ranks and, per layer of ``layers``, edited ranks of the first ``n`` items of ``stage``;
    with ``norm_layer``, also each prompt's residual-stream norm there, from the same clean pass.
    Prompts have their edited rows computed together as :class:`PromptGroups` gathers them
    (``budget``: bytes they may hold, :func:`group_budget` by default)."""
    if ties not in TIE_POLICIES:
        raise FvkitError(f"unknown near-tie policy '{ties}'; use one of {', '.join(TIE_POLICIES)}")
    layers = list(layers)
    if not layers:
        raise FvkitError("cached evaluation needs at least one layer")
    clean, edited, changes = [], [[] for _ in layers], [0.0] * len(layers)
    gap, n_ties, reruns, norms = 0.0, 0, 0, []

    def run_group(group):
        nonlocal gap, n_ties, reruns
        for item in group_ranks(lm, group, fv, layers, ties, chunk, norm_layer):
            clean.append(item["clean_rank"])
            norms.append(item["residual_norm"])
            for i in range(len(layers)):
                edited[i].append(item["ranks"][i])
                changes[i] = max(changes[i], item["changes"][i])
            gap = max(gap, item["gap"])
            n_ties += item["near_ties"]
            reruns += item["reruns"]

    chunk = len(layers) if chunk is None else max(1, int(chunk))
    groups = PromptGroups(lm, min(len(layers), chunk) + 1, run_group, budget=budget)
    with torch.no_grad():
        for j in progress(range(n), desc=desc or f"eval {stage}", enabled=show_progress):
            data, text = trial_prompt(lm, dataset, trials, stage, j, template)
            target = answer_ids(lm.tokenizer, text, data["query_target"]["output"])[0]
            inputs = lm.tokenizer([text], return_tensors="pt")
            groups.add((inputs, target), inputs["input_ids"].shape[1])
        groups.flush()
    return {"clean_rank_list": clean, "intervention_rank_lists": edited, "max_abs_logit_change": changes,
            "cached_clean_max_abs_diff": gap, "near_ties": n_ties, "near_tie_reruns": reruns,
            **({"residual_norms": norms} if norm_layer is not None else {})}


#: What makes a model unable to use the cached evaluation (callers fall back to whole prompts).
CACHE_REFUSALS = (UnsupportedCache, ReplayUnsupported)


def baseline_pass(lm, prompt_inputs, full_inputs, labels, target: int, keep_prefix: bool) -> tuple:
    """The clean few-shot item as :func:`fvkit.method.intervene.evaluate_baseline` computes it (one
    pass over prompt + answer: its loss and the logits before the answer, the same numbers from the
    output head on the last positions only): (item, clean logits, and with ``keep_prefix`` the
    pass's keys and values of the prompt but its last token, else None)."""
    model = lm.model
    prompt_len = prompt_inputs["input_ids"].shape[1]
    n_tokens = full_inputs["input_ids"].shape[1]
    # Only the positions before each answer token are read: the output head computes those
    # (and enough before them to round as over the whole sequence, see HEAD_POSITIONS), and
    # the loss is taken over them as the model's own loss takes it over the unmasked labels.
    first = n_tokens - min(n_tokens, max(HEAD_POSITIONS, n_tokens - prompt_len + 1))
    with _last_positions(adapters.resolve_lm_head(model, lm.spec), n_tokens - first):
        out = model(**full_inputs, use_cache=keep_prefix)
    before_answer = out.logits[0, prompt_len - 1 - first:n_tokens - 1 - first]
    clean_logits = before_answer[:1].clone()
    nll = torch.nn.functional.cross_entropy(before_answer.float(), labels[0, prompt_len:].to(before_answer.device))
    item = {"clean_rank": token_rank(clean_logits, target), "nll": nll.item()}
    if not keep_prefix:
        return item, clean_logits, None
    cache = output_cache(out)
    del out, before_answer  # not kept through the next pass
    if prompt_len < 2 or cache_length(cache) != n_tokens:
        raise UnsupportedCache(f"the few-shot pass's cache holds {cache_length(cache)} positions, expected {n_tokens}")
    prefix = PrefixCache(drop_last(cache, n_tokens - prompt_len + 1), prompt_len - 1)
    if cache_length(prefix._cache) != prompt_len - 1:
        raise UnsupportedCache(f"{type(cache).__name__} did not crop to the prompt's {prompt_len - 1} positions")
    return item, clean_logits, prefix


def baseline_items(lm, items, fv: Optional[torch.Tensor], layer: Optional[int], ties: str) -> list:
    """:func:`baseline_pass` of each of ``items`` ((prompt inputs, prompt + answer inputs, labels,
    target) each), and with ``fv`` the rank with the vector at ``layer``, read from the same pass's
    keys and values of the prompt; the prompts' edited rows run in one call."""
    passes = [baseline_pass(lm, *item, keep_prefix=fv is not None) for item in items]
    if fv is None:
        return [item for item, _, _ in passes]
    vec = fv.reshape(lm.dims.hidden_size).to(lm.model.dtype)
    rows = group_edited_rows(lm, [(prompt, prefix, clean) for (prompt, *_), (_, clean, prefix) in zip(items, passes)],
                             vec, [layer])
    found = []
    for (prompt, _, _, target), (item, clean, _), item_rows in zip(items, passes, rows):
        gap = (item_rows[-1] - clean[0]).abs().max().item()
        rank, change, n_ties, reruns = _read_rank(lambda L, prompt=prompt: edited_logits(lm, prompt, L, fv), target,
                                                  layer, item_rows[:1], item_rows[-1], clean, gap, ties)
        found.append({**item, "rank": rank, "change": change, "gap": gap, "near_ties": n_ties, "reruns": reruns})
    return found
