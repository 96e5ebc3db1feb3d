"""Causal indirect effect of every attention head (gate M3).

    ie = indirect_effects(lm, dataset, trials, mean_acts)           # (n_trials, n_layers, n_heads)

On each shuffled-label prompt, one head's out-projection input at the last
token is replaced by that head's mean activation at the last slot; the effect
is the change in probability of the first token of the target answer.

:func:`exact_trial` keeps the reference's structure: one full intervened forward
pass per layer and head. The fast strategy (:mod:`fvkit.fast.indirect_effect`)
reuses the clean pass and recomputes only the last position. Both take the
patch, the target probability and the difference from :mod:`fvkit.method.head_effect`.
"""

from __future__ import annotations

from typing import Callable

import torch

from fvkit.models import adapters
from fvkit.progress import progress
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.stage_inputs import answer_ids, n_used, trial_prompt
from fvkit.method.token_labels import dummy_token_labels, full_index_map, slot_index_map, token_meta_labels
from fvkit.method.head_effect import check_patch_fired, effect, head_patch, target_probs
from fvkit.models.tracer import EditInput

STAGE = "indirect_effect"
#: The label of the token whose prediction the effect is measured at.
LAST_TOKEN_LABEL = "query_predictive_token"


class TrialSetup:
    """Everything one indirect-effect trial needs, shared by the exact and fast paths.

        setup = TrialSetup.build(lm, dataset, trials, t, dummy, template)
        setup.inputs, setup.target_id, setup.last_slots
    """

    def __init__(self, inputs, target_id: int, last_slots: list, text: str):
        self.inputs = inputs
        self.target_id = target_id
        self.last_slots = last_slots
        self.text = text

    @classmethod
    def build(cls, lm, dataset, trials, t: int, dummy: list, template: Template) -> "TrialSetup":
        tok = lm.tokenizer
        data, _ = trial_prompt(lm, dataset, trials, STAGE, t, template)
        labels, text = token_meta_labels(data, tok, lm.spec.prepend_bos)
        idx_map = full_index_map(*slot_index_map(labels, dummy))
        # Every token labelled as the last one is patched at the last position, in order;
        # normally exactly one (no such token means no patch, an effect of zero).
        last_slots = [idx_map[i] for i, _, lab in labels if lab == LAST_TOKEN_LABEL]
        target_id = answer_ids(tok, text, data["query_target"]["output"])[0]
        return cls(tok([text], return_tensors="pt"), target_id, last_slots, text)


def exact_trial(lm, setup: TrialSetup, mean_acts: torch.Tensor) -> torch.Tensor:
    """(n_layers, n_heads) effects of one trial: one full intervened forward pass per layer and head."""
    dims, model = lm.dims, lm.model
    effects = torch.zeros(dims.n_layers, dims.n_heads)
    clean_probs = target_probs(model(**setup.inputs).logits[:, -1, :][0], setup.target_id)
    for layer in range(dims.n_layers):
        o_proj = adapters.resolve_out_proj(model, lm.spec, layer)
        for head in range(dims.n_heads):
            patch = head_patch(mean_acts, layer, setup.last_slots, dims.n_heads, dims.head_dim, heads=[head])
            with EditInput(o_proj, patch) as edit:
                logits = model(**setup.inputs).logits[:, -1, :]
            check_patch_fired(edit, lm, layer)
            effects[layer, head] = effect(target_probs(logits, setup.target_id), clean_probs)
    return effects


def indirect_effects(lm, dataset, trials, mean_acts: torch.Tensor, template: Template = DEFAULT_TEMPLATE,
                     max_trials=None, trial: Callable = exact_trial, desc: str = "indirect effect (exact)",
                     show_progress: bool = True) -> torch.Tensor:
    """(n_trials, n_layers, n_heads) effects, each trial computed by ``trial(lm, setup, mean_acts)``.

    ``trial`` is :func:`exact_trial` or the fast strategy's
    :func:`fvkit.fast.indirect_effect.fast_trial`; :func:`fvkit.pipeline.indirect_effects`
    picks one by ``--ie-mode`` name, so this module never imports the fast one.
    """
    dims = lm.dims
    n = n_used(trials.n_items(STAGE), max_trials)
    dummy = dummy_token_labels(trials.n_shots, lm.tokenizer, lm.spec.prepend_bos, lm.spec.bos_text, template)
    out = torch.zeros(n, dims.n_layers, dims.n_heads)
    with torch.no_grad():
        for t in progress(range(n), desc=desc, enabled=show_progress):
            setup = TrialSetup.build(lm, dataset, trials, t, dummy, template)
            out[t] = trial(lm, setup, mean_acts)
    return out
