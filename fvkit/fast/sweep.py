"""Zero-shot and shuffled-label accuracy with the function vector injected at every layer.

    sweep = layer_sweep(lm, dataset, trials, fv)
    sweep["stages"]["zero_shot"]["intervention_topk"][5]   # [[1, acc], [2, acc], [3, acc]] at layer 5
    sweep["best_layer"]["zero_shot"]                       # layer with the highest top-1
    layer_result(sweep, "zero_shot", 5)                    # what evaluate(..., edit_layer=5) returns

Each prompt is run once whole and its last token replayed through the blocks
with one row per layer plus one clean row (:mod:`fvkit.fast.evaluation`): one
prompt pass plus one one-token pass replaces the ``2 * n_layers`` whole-prompt
passes of evaluating every layer separately. Near ties (another token's logit
within the one-token pass's float32 noise of the target's) are re-run as whole
prompts, exactly as ``evaluate`` runs them, so the rank lists are identical to
per-layer ``evaluate`` calls (``ties="report"`` only counts them). The result
counts both.

When a model's cache cannot be cut (see :mod:`fvkit.fast.cache`) or its blocks not replayed,
``method="auto"`` falls back to whole-prompt passes through ``evaluate``; the
result says which method ran. ``method="batched"`` runs ``batch_size`` prompts per
pass, one pass per layer (:mod:`fvkit.fast.batched`).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from fvkit.models import adapters
from fvkit.errors import FvkitError
from fvkit.fast.batched import batched_stage
from fvkit.fast.evaluation import CACHE_REFUSALS, cached_stage
from fvkit.method.intervene import EVAL_STAGES, evaluate, topk_accuracy
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.run_defaults import DEFAULT_EVAL_BATCH_SIZE
from fvkit.method.stage_inputs import n_used

METHODS = ("auto", "cached", "full", "batched")


def _best_layer(topks: list) -> int:
    """Highest top-1 accuracy, ties broken by top-2, then top-3, then the earlier layer."""
    return max(range(len(topks)), key=lambda L: (tuple(acc for _, acc in topks[L]), -L))


def _cached_stage(lm, dataset, trials, stage, fv, template, n, chunk, show_progress, ties="rerun",
                  norm_layer=None) -> dict:
    return cached_stage(lm, dataset, trials, stage, fv, range(lm.dims.n_layers), template, n, ties=ties,
                        chunk=chunk, show_progress=show_progress, desc=f"layer sweep {stage}", norm_layer=norm_layer)


def _full_stage(lm, dataset, trials, stage, fv, template, n, show_progress) -> dict:
    runs = [evaluate(lm, dataset, trials, stage, fv, L, template, max_items=n, show_progress=show_progress)
            for L in range(lm.dims.n_layers)]
    return {"clean_rank_list": runs[0]["clean_rank_list"],
            "intervention_rank_lists": [r["intervention_rank_list"] for r in runs],
            "max_abs_logit_change": [r["max_abs_logit_change"] for r in runs],
            "cached_clean_max_abs_diff": 0.0, "near_ties": 0, "near_tie_reruns": 0}


def layer_sweep(lm, dataset, trials, fv: torch.Tensor, template: Template = DEFAULT_TEMPLATE,
                max_items: Optional[int] = None, method: str = "auto", max_rows: Optional[int] = None,
                ties: str = "rerun", show_progress: bool = True, norm_layer: Optional[int] = None,
                batch_size: int = DEFAULT_EVAL_BATCH_SIZE) -> dict:
    """Every layer's zero-shot and shuffled-label ranks with the vector injected there.

    ``max_rows`` caps the layers replayed together in one batch; by default all
    layers run in one batch. ``ties``: see :mod:`fvkit.fast.evaluation`. With
    ``norm_layer``, a cached sweep's stages also hold ``residual_norms`` (see
    :func:`fvkit.fast.evaluation.cached_stage`).
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
            if used == "batched":
                raw = batched_stage(lm, dataset, trials, stage, fv, range(n_layers), template, n,
                                    batch_size=batch_size, ties=ties, show_progress=show_progress,
                                    desc=f"layer sweep {stage} (batched)")
            if used in ("auto", "cached"):
                try:
                    raw = _cached_stage(lm, dataset, trials, stage, fv, template, n, chunk, show_progress, ties,
                                        norm_layer)
                    used = "cached"
                except CACHE_REFUSALS as err:
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
        **({"batch_size": batch_size} if used == "batched" else {}),
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
