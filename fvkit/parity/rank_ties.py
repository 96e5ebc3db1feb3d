"""Rank lists that differ only where two logits tie within float noise.

    adjusted, ties = resolve_rank_ties(ours_part, ref_part, EvalLogits(lm, dataset, trials, fv, edit_layer))
    compare_gate("M4", adjusted, ref_part, "snapshot")
    adjusted, ties = resolve_sweep_ties(ours_sweep, ref_sweep, lambda layer: EvalLogits(lm, dataset, trials, fv, layer))

A rank is the position of the target token among tens of thousands of logits.
Far down that list many logits lie within 1e-6 of each other, so a function
vector that matches the reference's to 1e-7 (well inside FV_REL_TOL), or a
transformers release that sums in another order, can swap two neighbours and
move a rank by one. Such an item is accepted only when the logits show the
tie: both ranks, fvkit's and the reference's, must be positions the target
can take when the logits within RANK_TIE_REL_TOL of its own are ordered either
way (:func:`tie_ranks`). The ranks are read from the logits here, never
through fvkit's rank function, so a wrong rank function cannot vouch for its
own ranks: a rank outside the target's block of tied logits is a difference
the reference's ordering can tell apart, and the gate fails on it. fvkit's rank
is then replaced by the reference's (and top-k recomputed), every replacement
is reported, and any other difference is left for the gate to fail on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fvkit.method.intervene import inject, topk_accuracy
from fvkit.method.stage_inputs import answer_ids, trial_prompt
from fvkit.parity.registry import EVAL_KEYS, SWEEP_KEY
from fvkit.parity.tolerances import RANK_TIE_REL_TOL

#: Rank lists and the logits they are read from.
RANK_LISTS = {"clean_rank_list": "clean", "intervention_rank_list": "intervention"}
TOPK_OF = {"clean_rank_list": "clean_topk", "intervention_rank_list": "intervention_topk"}


@dataclass
class EvalLogits:
    """fvkit's logits of one evaluation item, computed the way ``fvkit.method.intervene`` does.

        logits, target = EvalLogits(lm, dataset, trials, fv, edit_layer)("shuffled", "intervention", 3)
    """

    lm: object
    dataset: object
    trials: object
    fv: torch.Tensor
    edit_layer: int

    def __call__(self, stage: str, kind: str, item: int) -> tuple:
        tok, model = self.lm.tokenizer, self.lm.model
        data, text = trial_prompt(self.lm, self.dataset, self.trials, stage, item)
        answer = data["query_target"]["output"]
        target = answer_ids(tok, text, answer)[0]
        with torch.no_grad():
            if stage == "baseline":
                prompt_len = len(tok([text]).input_ids[0])
                logits = model(**tok([text + answer], return_tensors="pt")).logits[0, prompt_len - 1]
            elif kind == "intervention":
                with inject(self.lm, self.edit_layer, self.fv):
                    logits = model(**tok([text], return_tensors="pt")).logits[0, -1]
            else:
                logits = model(**tok([text], return_tensors="pt")).logits[0, -1]
        return logits, target


def tie_ranks(logits: torch.Tensor, target: int) -> range:
    """Every 0-based rank the target can take in a descending ordering of ``logits`` when
    the logits within RANK_TIE_REL_TOL (of the largest |logit|) of its own are ordered
    either way: from the number of logits clearly above it to the number not clearly
    below it, less one. Computed from the logits alone."""
    values = logits.reshape(-1).to(torch.float64)
    scale = float(values.abs().max()) or 1.0
    own, slack = float(values[target]), RANK_TIE_REL_TOL * scale
    above = int((values > own + slack).sum())
    not_below = int((values >= own - slack).sum())
    return range(above, not_below)


def tie_gap(logits: torch.Tensor, target: int, rank: int) -> float:
    """|logit at ``rank`` of the descending ordering - target logit|, relative to the largest |logit|."""
    ordered = torch.sort(logits.reshape(-1).to(torch.float64), descending=True).values
    if not 0 <= rank < ordered.numel():
        return float("inf")
    scale = float(ordered.abs().max()) or 1.0
    return abs(float(ordered[rank]) - float(logits.reshape(-1)[target])) / scale


def resolve_rank_ties(ours: dict, ref: dict, logits_of) -> tuple:
    """(ours with tie-explained ranks replaced by the reference's, [tie records])."""
    adjusted = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ours.items()}
    ties = []
    for stage in EVAL_KEYS:
        if stage not in ref or stage not in adjusted:
            continue
        for key, kind in RANK_LISTS.items():
            mine, theirs = adjusted[stage].get(key), ref[stage].get(key)
            if not isinstance(mine, list) or not isinstance(theirs, list) or len(mine) != len(theirs):
                continue
            fixed = list(mine)
            for item, (a, b) in enumerate(zip(mine, theirs)):
                if a == b:
                    continue
                logits, target = logits_of(stage, kind, item)
                tied = tie_ranks(logits, target)
                # Both ranks must lie in the target's block of tied logits: fvkit's rank outside
                # it is a wrong rank (the logits do not give it), the reference's outside it a
                # real difference. The gap reported is the larger of the two.
                if a in tied and b in tied:
                    fixed[item] = b
                    ties.append({"stage": stage, "list": key, "item": item, "fvkit_rank": a, "reference_rank": b,
                                 "relative_logit_gap": max(tie_gap(logits, target, a), tie_gap(logits, target, b))})
            if fixed != mine:
                adjusted[stage][key] = fixed
                adjusted[stage][TOPK_OF[key]] = topk_accuracy(fixed)
    return adjusted, ties


def resolve_sweep_ties(ours: dict, ref: dict, logits_at) -> tuple:
    """:func:`resolve_rank_ties` for every layer of a layer sweep (``ours[SWEEP_KEY][stage][layer]``);
    ``logits_at(layer)`` gives the ``logits_of`` of the vector injected at that layer."""
    mine, theirs = ours.get(SWEEP_KEY) or {}, ref.get(SWEEP_KEY) or {}
    adjusted = {stage: list(layers) for stage, layers in mine.items()}
    ties = []
    for stage, ref_layers in theirs.items():
        layers = adjusted.get(stage)
        if layers is None or len(layers) != len(ref_layers):
            continue
        for layer, (a, b) in enumerate(zip(layers, ref_layers)):
            if a == b:
                continue
            fixed, found = resolve_rank_ties({stage: a}, {stage: b}, logits_at(layer))
            layers[layer] = fixed[stage]
            ties.extend({**t, "stage": f"{SWEEP_KEY}.{stage}[layer {layer}]"} for t in found)
    return {**ours, SWEEP_KEY: adjusted}, ties
