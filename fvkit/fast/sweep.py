"""Zero-shot and shuffled-label accuracy with the function vector injected at every layer.

    sweep = layer_sweep(lm, dataset, trials, fv)
    sweep["stages"]["zero_shot"]["intervention_topk"][5]   # [[1, acc], [2, acc], [3, acc]] at layer 5
    sweep["best_layer"]["zero_shot"]                       # layer with the highest top-1
    layer_result(sweep, "zero_shot", 5)                    # what evaluate(..., edit_layer=5) returns

The vector changes only the hidden state at the last position, and a causal
model's earlier positions never see the last one. So each prompt is run once
whole (its clean logits, computed exactly as :func:`fvkit.method.intervene.evaluate`
computes them), its key/value cache is cut back by one token, and the last token
alone is run in a batch with one row per layer plus one clean row: a hook on
every block adds the vector to its own row only. One prompt pass plus one
one-token pass replaces the ``2 * n_layers`` whole-prompt passes of evaluating
every layer separately.

The one-token pass computes the same numbers through differently shaped
matrix products, so its logits differ from a whole-prompt pass by float32
rounding (~1e-5). That cannot move a rank unless another token's logit lies
within that noise of the target's; such near-ties are re-run as whole prompts,
exactly as ``evaluate`` runs them, so the rank lists are identical to
per-layer ``evaluate`` calls. The result counts the re-runs.

When a model's cache cannot be cut and copied (see :mod:`fvkit.fast.cache`),
``method="auto"`` falls back to whole-prompt passes through ``evaluate``; the
result says which method ran.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from fvkit.fast.cache_names import cache_kwargs, output_cache
from fvkit.models import adapters
from fvkit.errors import FvkitError
from fvkit.method.intervene import EVAL_STAGES, edited_logits, evaluate, token_rank, topk_accuracy
from fvkit.fast.cache import PrefixCache, UnsupportedCache, last_token_inputs
from fvkit.progress import progress
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.stage_inputs import answer_ids, n_used, trial_prompt
from fvkit.models.placement import to_like
from fvkit.models.tracer import TraceDict, first_tensor, replace_first_tensor

METHODS = ("auto", "cached", "full")

#: How far the one-token pass's logits may be from the whole-prompt pass's, as a
#: multiple of the gap measured on the clean row of the same batch. Edited rows go
#: through the same kernels as the clean row; their largest gap was at most 1.5x the
#: clean row's on every tiny architecture and 2.7x on SmolLM2-135M (30 layers), so
#: 8x leaves a threefold margin over the worst seen.
TIE_NOISE_FACTOR = 8.0
#: Floor of that noise bound in float32 ulps of the row's largest |logit|, for
#: prompts whose clean row happens to agree bit for bit.
TIE_NOISE_ULPS = 4


def _noise_bound(logits: torch.Tensor, clean_gap: float) -> float:
    ulp = torch.finfo(torch.float32).eps * logits.abs().max().item()
    return max(TIE_NOISE_FACTOR * clean_gap, TIE_NOISE_ULPS * ulp)


def _near_tie(logits: torch.Tensor, target: int, bound: float) -> bool:
    """Some other token's logit within twice the noise bound of the target's (both may move)."""
    row = logits.reshape(-1)
    close = (row - row[target]).abs() <= 2 * bound
    return int(close.sum().item()) > 1


def _best_layer(topks: list) -> int:
    """Highest top-1 accuracy, ties broken by top-2, then top-3, then the earlier layer."""
    return max(range(len(topks)), key=lambda L: (tuple(acc for _, acc in topks[L]), -L))


class _RowInjector:
    """Hooks on every block; block ``L`` adds the vector to the last position of row ``L - first``.

        with _RowInjector(lm, vec, layers=range(0, 8)) as inj:
            model(...)           # rows 0..7 edited at layers 0..7, row 8 (if any) left clean
    """

    def __init__(self, lm, vec: torch.Tensor, layers):
        self.layers = list(layers)
        self.vec = vec
        self.row_of = {adapters.block_name(lm.spec, L): i for i, L in enumerate(self.layers)}
        self.trace = TraceDict(lm.model, list(self.row_of), retain_output=False, edit_output=self._edit)

    def _edit(self, output, name):
        hidden = first_tensor(output).clone()
        hidden[self.row_of[name], -1] += to_like(self.vec, hidden)  # the block's device and dtype
        return replace_first_tensor(output, hidden)

    def __enter__(self):
        self.trace.__enter__()
        return self

    def __exit__(self, *exc):
        self.trace.__exit__(*exc)
        bad = {name: t.fired for name, t in self.trace.items() if t.fired != 1}
        if bad and exc[0] is None:
            raise FvkitError(f"injection hooks ran {bad} times, expected once each; "
                             f"the spec's blocks_path is not on the forward path")
        return False


def _sweep_item(lm, inputs, target: int, fv: torch.Tensor, n_layers: int, chunk: int):
    """Clean rank, per-layer edited ranks and logit changes, cache gap and re-runs for one prompt."""
    model = lm.model
    vec = fv.reshape(1, lm.dims.hidden_size).to(model.dtype)[0]
    n_tokens = inputs["input_ids"].shape[1]
    out = model(**inputs, use_cache=True)
    clean_logits = out.logits[:, -1, :]
    prefix = PrefixCache.from_output(output_cache(out), n_tokens)
    ranks, changes, drift, reruns = [], [], 0.0, 0
    starts = list(range(0, n_layers, chunk))
    for c, start in enumerate(starts):
        layers = range(start, min(start + chunk, n_layers))
        rows = len(layers) + 1  # the last row stays clean: the guard's point of comparison
        cache = prefix.take(rows, reuse=(c == len(starts) - 1))
        with _RowInjector(lm, vec, layers):
            logits = model(**last_token_inputs(inputs, rows), **cache_kwargs(model, cache), use_cache=True).logits[:, -1, :]
        cached_clean = logits[-1:]
        gap = (cached_clean - clean_logits).abs().max().item()
        drift = max(drift, gap)
        for i, L in enumerate(layers):
            edited = logits[i:i + 1]
            if (edited - cached_clean).abs().max().item() == 0.0:
                raise FvkitError(f"injecting the function vector at layer {L} did not change the output; "
                                 f"the vector is zero or the edit was lost")
            if _near_tie(edited, target, _noise_bound(edited, gap)):
                edited = edited_logits(lm, inputs, L, fv)
                reruns += 1
            ranks.append(token_rank(edited, target))
            changes.append((edited - clean_logits).abs().max().item())
    return token_rank(clean_logits, target), ranks, changes, drift, reruns


def _cached_stage(lm, dataset, trials, stage, fv, template, n, chunk, show_progress) -> dict:
    n_layers = lm.dims.n_layers
    clean, edited, changes, drift, reruns = [], [[] for _ in range(n_layers)], [0.0] * n_layers, 0.0, 0
    for j in progress(range(n), desc=f"layer sweep {stage}", enabled=show_progress):
        data, text = trial_prompt(lm, dataset, trials, stage, j, template)
        target = answer_ids(lm.tokenizer, text, data["query_target"]["output"])[0]
        inputs = lm.tokenizer([text], return_tensors="pt")
        rank, ranks, item_changes, item_drift, item_reruns = _sweep_item(lm, inputs, target, fv, n_layers, chunk)
        clean.append(rank)
        for L in range(n_layers):
            edited[L].append(ranks[L])
            changes[L] = max(changes[L], item_changes[L])
        drift = max(drift, item_drift)
        reruns += item_reruns
    return {"clean_rank_list": clean, "intervention_rank_lists": edited,
            "max_abs_logit_change": changes, "cached_clean_max_abs_diff": drift, "near_tie_reruns": reruns}


def _full_stage(lm, dataset, trials, stage, fv, template, n, show_progress) -> dict:
    runs = [evaluate(lm, dataset, trials, stage, fv, L, template, max_items=n, show_progress=show_progress)
            for L in range(lm.dims.n_layers)]
    return {"clean_rank_list": runs[0]["clean_rank_list"],
            "intervention_rank_lists": [r["intervention_rank_list"] for r in runs],
            "max_abs_logit_change": [r["max_abs_logit_change"] for r in runs],
            "cached_clean_max_abs_diff": 0.0, "near_tie_reruns": 0}


def layer_sweep(lm, dataset, trials, fv: torch.Tensor, template: Template = DEFAULT_TEMPLATE,
                max_items: Optional[int] = None, method: str = "auto", max_rows: Optional[int] = None,
                show_progress: bool = True) -> dict:
    """Every layer's zero-shot and shuffled-label ranks with the vector injected there.

    ``max_rows`` caps the layers run together in one batch (memory: each row holds a
    copy of the prompt's cache); by default all layers run in one batch.
    """
    if method not in METHODS:
        raise FvkitError(f"unknown layer-sweep method '{method}'; use one of {', '.join(METHODS)}")
    trials.check_dataset(dataset)
    n_layers = lm.dims.n_layers
    adapters.check_layer(lm.model, lm.spec, n_layers - 1)
    if fv.numel() != lm.dims.hidden_size:
        raise FvkitError(f"function vector has {fv.numel()} entries, the model's hidden size is {lm.dims.hidden_size}")
    chunk = n_layers if max_rows is None else max(1, int(max_rows))
    start = time.perf_counter()
    used, why = method, None
    stages = {}
    with torch.no_grad():
        for stage in EVAL_STAGES:
            n = n_used(trials.n_items(stage), max_items)
            raw = None
            if used in ("auto", "cached"):
                try:
                    raw = _cached_stage(lm, dataset, trials, stage, fv, template, n, chunk, show_progress)
                    used = "cached"
                except UnsupportedCache as err:
                    if method == "cached":
                        raise
                    used, why = "full", str(err)
            if raw is None:
                raw = _full_stage(lm, dataset, trials, stage, fv, template, n, show_progress)
            raw.update(n_items=n, clean_topk=topk_accuracy(raw["clean_rank_list"]),
                       intervention_topk=[topk_accuracy(r) for r in raw["intervention_rank_lists"]])
            stages[stage] = raw
    return {
        "model": getattr(lm, "name", None),
        "trials_id": trials.id,
        "n_layers": n_layers,
        "layers": list(range(n_layers)),
        "method": used,
        **({"fallback_reason": why} if why else {}),
        "stages": stages,
        "best_layer": {s: _best_layer(stages[s]["intervention_topk"]) for s in stages},
        "seconds": round(time.perf_counter() - start, 4),
    }


def layer_result(sweep: dict, stage: str, layer: int) -> dict:
    """One layer of a sweep in the layout :func:`fvkit.method.intervene.evaluate` returns."""
    if stage not in sweep["stages"]:
        raise FvkitError(f"the sweep has no stage '{stage}'; it has {', '.join(sweep['stages'])}")
    if not 0 <= layer < sweep["n_layers"]:
        raise FvkitError(f"layer {layer} is out of range for this sweep: valid layers are 0..{sweep['n_layers'] - 1}")
    s = sweep["stages"][stage]
    return {
        "clean_rank_list": s["clean_rank_list"],
        "intervention_rank_list": s["intervention_rank_lists"][layer],
        "clean_topk": s["clean_topk"],
        "intervention_topk": s["intervention_topk"][layer],
        "n_items": s["n_items"],
        "edit_layer": layer,
        "max_abs_logit_change": s["max_abs_logit_change"][layer],
    }
