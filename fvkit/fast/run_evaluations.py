"""A run's zero-shot and shuffled-label evaluations, and its layer sweep, from one pass per prompt.

    evals = run_evaluations(lm, dataset, trials, fv, edit_layer=6, sweep=True)
    evals.zero_shot, evals.shuffled     # what evaluate(..., edit_layer=6) returns, per stage
    evals.sweep                         # what layer_sweep(...) returns (None without sweep=True)
    evals.info                          # method, near ties, re-runs, seconds
    base, info = run_baseline(lm, dataset, trials, fv, edit_layer=6)   # clean few-shot, and with the vector

``method="cached"`` (the default) runs each evaluation prompt once and reads the
clean answer, the answer with the vector at the edit layer and, with
``sweep=True``, the answer with the vector at every layer from that one pass
(:mod:`fvkit.fast.evaluation`). ``method="exact"`` is the reference's structure:
whole-prompt passes per item, condition and layer. With ``ties="rerun"`` both
give the same rank lists; a model whose cache or blocks the cached method cannot
use falls back to ``exact`` and says so in ``info``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from fvkit.errors import FvkitError
from fvkit.fast.batched import batched_stage
from fvkit.fast.evaluation import CACHE_REFUSALS, PromptGroups, baseline_items, cached_stage
from fvkit.fast.sweep import layer_result, layer_sweep
from fvkit.method.intervene import EVAL_STAGES, evaluate, evaluate_baseline, topk_accuracy
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.run_defaults import DEFAULT_EVAL_BATCH_SIZE, DEFAULT_EVAL_METHOD, EVAL_METHODS, TIE_POLICIES
from fvkit.method.stage_inputs import answer_ids, n_used, trial_prompt
from fvkit.progress import progress


@dataclass
class Evaluations:
    zero_shot: dict
    shuffled: dict
    sweep: Optional[dict] = None
    info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    #: The residual stream's norm at the edit layer for each zero-shot, then each shuffled-label
    #: prompt, read from the cached evaluation's clean passes (None when whole prompts ran:
    #: :func:`fvkit.method.vector_scale.residual_norms` then measures it).
    residual_norms: Optional[list] = None


def _joined_norms(per_stage: dict) -> Optional[list]:
    """Each stage's residual norms, in EVAL_STAGES order, as one list (None if a stage has none)."""
    found = [per_stage[stage] for stage in EVAL_STAGES]
    return None if any(f is None for f in found) else [x for f in found for x in f]


def _one_layer(lm, dataset, trials, stage, fv, edit_layer, template, ties, show_progress,
               batch_size: Optional[int] = None) -> tuple:
    """One stage at ``edit_layer``: cached, or batched when ``batch_size`` is given."""
    n = n_used(trials.n_items(stage), None)
    if batch_size is None:
        raw = cached_stage(lm, dataset, trials, stage, fv, [edit_layer], template, n, ties=ties,
                           show_progress=show_progress, norm_layer=edit_layer)
    else:
        raw = batched_stage(lm, dataset, trials, stage, fv, [edit_layer], template, n, batch_size=batch_size,
                            ties=ties, show_progress=show_progress)
    ranks = raw["intervention_rank_lists"][0]
    result = {"clean_rank_list": raw["clean_rank_list"], "intervention_rank_list": ranks,
              "clean_topk": topk_accuracy(raw["clean_rank_list"]), "intervention_topk": topk_accuracy(ranks),
              "n_items": n, "edit_layer": edit_layer, "max_abs_logit_change": raw["max_abs_logit_change"][0]}
    return result, {"near_ties": raw["near_ties"], "near_tie_reruns": raw["near_tie_reruns"],
                    "cached_clean_max_abs_diff": raw["cached_clean_max_abs_diff"],
                    "residual_norms": raw.get("residual_norms")}


def _exact(lm, dataset, trials, fv, edit_layer, template, show_progress) -> Evaluations:
    timings, out = {}, {}
    for stage in EVAL_STAGES:
        start = time.perf_counter()
        out[stage] = evaluate(lm, dataset, trials, stage, fv, edit_layer, template, show_progress=show_progress)
        timings[f"eval_{stage}"] = round(time.perf_counter() - start, 4)
    return Evaluations(out["zero_shot"], out["shuffled"], timings=timings)


def run_evaluations(lm, dataset, trials, fv, edit_layer: int, template: Template = DEFAULT_TEMPLATE, *,
                    sweep: bool = False, method: str = DEFAULT_EVAL_METHOD, ties: str = "rerun",
                    batch_size: int = DEFAULT_EVAL_BATCH_SIZE, show_progress: bool = True) -> Evaluations:
    """Both evaluation stages at ``edit_layer`` and, with ``sweep``, at every layer.
    ``batch_size``: prompts per pass of the ``batched`` method (:mod:`fvkit.fast.batched`)."""
    if method not in EVAL_METHODS:
        raise FvkitError(f"unknown evaluation method '{method}'; use one of {', '.join(EVAL_METHODS)}")
    if ties not in TIE_POLICIES:
        raise FvkitError(f"unknown near-tie policy '{ties}'; use one of {', '.join(TIE_POLICIES)}")
    if sweep:
        # The sweep's pass holds every layer, the edit layer among them: one pass serves both.
        sweep_method = {"cached": "auto", "exact": "full", "batched": "batched"}[method]
        s = layer_sweep(lm, dataset, trials, fv, template, method=sweep_method, ties=ties,
                        show_progress=show_progress, norm_layer=edit_layer, batch_size=batch_size)
        # Kept out of the sweep's own results (layer_sweep.json): the vector-scale check reports them.
        norms = _joined_norms({stage: s["stages"][stage].pop("residual_norms", None) for stage in EVAL_STAGES})
        info = {"method": s["method"], **({"fallback_reason": s["fallback_reason"]} if "fallback_reason" in s else {}),
                "ties": ties, "layers": "all", **({"batch_size": s["batch_size"]} if "batch_size" in s else {}),
                **{f"{stage}_{k}": s["stages"][stage][k] for stage in EVAL_STAGES
                   for k in ("near_ties", "near_tie_reruns", "cached_clean_max_abs_diff")}}
        return Evaluations(layer_result(s, "zero_shot", edit_layer), layer_result(s, "shuffled", edit_layer),
                           sweep=s, info=info, timings={"layer_sweep": s["seconds"]}, residual_norms=norms)
    if method == "exact":
        out = _exact(lm, dataset, trials, fv, edit_layer, template, show_progress)
        out.info = {"method": "exact", "layers": [edit_layer]}
        return out
    results, info, timings, norms = {}, {"method": method, "ties": ties, "layers": [edit_layer]}, {}, {}
    if method == "batched":
        info["batch_size"] = batch_size
    try:
        for stage in EVAL_STAGES:
            start = time.perf_counter()
            results[stage], counts = _one_layer(lm, dataset, trials, stage, fv, edit_layer, template, ties,
                                                show_progress, batch_size if method == "batched" else None)
            norms[stage] = counts.pop("residual_norms")
            timings[f"eval_{stage}"] = round(time.perf_counter() - start, 4)
            info.update({f"{stage}_{k}": v for k, v in counts.items()})
    except CACHE_REFUSALS as err:
        out = _exact(lm, dataset, trials, fv, edit_layer, template, show_progress)
        out.info = {"method": "exact", "layers": [edit_layer], "fallback_reason": str(err)}
        return out
    return Evaluations(results["zero_shot"], results["shuffled"], info=info, timings=timings,
                       residual_norms=_joined_norms(norms))


def run_baseline(lm, dataset, trials, fv, edit_layer: int, template: Template = DEFAULT_TEMPLATE, *,
                 method: str = DEFAULT_EVAL_METHOD, ties: str = "rerun", show_progress: bool = True) -> tuple:
    """(clean few-shot evaluation, info). ``cached`` adds the ranks with the vector at ``edit_layer``
    (``intervention_rank_list``/``_topk``), read from the same pass over each prompt and answer;
    the clean ranks and perplexity are computed exactly as ``evaluate_baseline`` computes them."""
    if method == "exact":
        return evaluate_baseline(lm, dataset, trials, template, show_progress=show_progress), {"method": "exact"}
    try:
        return _cached_baseline(lm, dataset, trials, fv, edit_layer, template, ties, show_progress)
    except CACHE_REFUSALS as err:
        return (evaluate_baseline(lm, dataset, trials, template, show_progress=show_progress),
                {"method": "exact", "fallback_reason": str(err)})


def _cached_baseline(lm, dataset, trials, fv, edit_layer, template, ties, show_progress) -> tuple:
    tok = lm.tokenizer
    n = n_used(trials.n_items("baseline"), None)
    ranks, edited, nlls, change, gap, n_ties, reruns = [], [], [], 0.0, 0.0, 0, 0

    def run_group(group):
        nonlocal change, gap, n_ties, reruns
        for item in baseline_items(lm, group, fv, edit_layer, ties):
            ranks.append(item["clean_rank"])
            nlls.append(item["nll"])
            edited.append(item["rank"])
            change, gap = max(change, item["change"]), max(gap, item["gap"])
            n_ties += item["near_ties"]
            reruns += item["reruns"]

    groups = PromptGroups(lm, 2, run_group, record=False)   # the vector's row and the clean one
    with torch.no_grad():
        for j in progress(range(n), desc="eval baseline", enabled=show_progress):
            data, text = trial_prompt(lm, dataset, trials, "baseline", j, template)
            answer = data["query_target"]["output"]
            target = answer_ids(tok, text, answer)[0]
            prompt = tok([text], return_tensors="pt")
            full = tok([text + answer], return_tensors="pt")
            labels = full.input_ids.clone()
            labels[:, :prompt["input_ids"].shape[1]] = -100
            groups.add((prompt, full, labels, target), prompt["input_ids"].shape[1])
        groups.flush()
    result = {"clean_rank_list": ranks, "clean_topk": topk_accuracy(ranks), "clean_ppl": float(np.exp(nlls).mean()),
              "n_items": n, "intervention_rank_list": edited, "intervention_topk": topk_accuracy(edited),
              "edit_layer": edit_layer, "max_abs_logit_change": change}
    return result, {"method": "cached", "ties": ties, "near_ties": n_ties, "near_tie_reruns": reruns,
                    "cached_clean_max_abs_diff": gap}
