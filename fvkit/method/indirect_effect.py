"""Causal indirect effect of every attention head (gate M3).

    ie = indirect_effects(lm, dataset, trials, mean_acts)           # (n_trials, n_layers, n_heads)

On each shuffled-label prompt, one head's out-projection input at the last
token is replaced by that head's mean activation at the last slot; the effect
is the change in probability of the first token of the target answer.

``mode="exact"`` keeps the reference's structure: one full intervened forward
pass per layer and head. ``mode="fast"`` (:mod:`fvkit.fast.indirect_effect`)
reuses the clean pass and recomputes only the last position.
"""

from __future__ import annotations

import torch

from fvkit.models import adapters
from fvkit.errors import FvkitError
from fvkit.progress import progress
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.stage_inputs import answer_ids, n_used, trial_prompt
from fvkit.method.token_labels import dummy_token_labels, full_index_map, slot_index_map, token_meta_labels
from fvkit.models.tracer import EditInput

STAGE = "indirect_effect"
MODES = ("exact", "fast")
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


def patch_head(x: torch.Tensor, head: int, values: list, n_heads: int, head_dim: int) -> torch.Tensor:
    """A copy of an out-projection input with ``head`` at the last token set to each value in turn."""
    x = x.clone()
    view = x.view(*x.shape[:-1], n_heads, head_dim)
    for v in values:
        view[-1, -1, head] = v
    return x


def _exact_trial(lm, setup: TrialSetup, mean_acts: torch.Tensor) -> torch.Tensor:
    dims, model = lm.dims, lm.model
    effect = torch.zeros(dims.n_layers, dims.n_heads)
    clean_probs = torch.softmax(model(**setup.inputs).logits[:, -1, :][0], dim=-1)
    for layer in range(dims.n_layers):
        o_proj = adapters.resolve_out_proj(model, lm.spec, layer)
        for head in range(dims.n_heads):
            values = [mean_acts[layer, head, s] for s in setup.last_slots]
            fn = lambda x, h=head, v=values: patch_head(x, h, v, dims.n_heads, dims.head_dim)
            with EditInput(o_proj, fn) as edit:
                logits = model(**setup.inputs).logits[:, -1, :]
            check_patch_fired(edit, lm, layer)
            probs = torch.softmax(logits, dim=-1)
            effect[layer, head] = (probs - clean_probs)[0, setup.target_id]
    return effect


def check_patch_fired(edit: EditInput, lm, layer: int) -> None:
    """A head patch must run exactly once per forward pass, or the effect measures nothing."""
    if edit.fired != 1:
        raise FvkitError(f"the patch on {adapters.out_proj_name(lm.spec, layer)} ran {edit.fired} times, expected once")


def indirect_effects(lm, dataset, trials, mean_acts: torch.Tensor, template: Template = DEFAULT_TEMPLATE,
                     max_trials=None, mode: str = "exact", show_progress: bool = True) -> torch.Tensor:
    if mode not in MODES:
        raise FvkitError(f"unknown indirect-effect mode '{mode}'; use one of {', '.join(MODES)}")
    if mode == "fast":
        from fvkit.fast.indirect_effect import fast_trial as trial_fn
    else:
        trial_fn = _exact_trial
    dims = lm.dims
    n = n_used(trials.n_items(STAGE), max_trials)
    dummy = dummy_token_labels(trials.n_shots, lm.tokenizer, lm.spec.prepend_bos, lm.spec.bos_text, template)
    out = torch.zeros(n, dims.n_layers, dims.n_heads)
    with torch.no_grad():
        for t in progress(range(n), desc=f"indirect effect ({mode})", enabled=show_progress):
            setup = TrialSetup.build(lm, dataset, trials, t, dummy, template)
            out[t] = trial_fn(lm, setup, mean_acts)
    return out
