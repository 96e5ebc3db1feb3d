"""Prompts longer than the model's context are refused before any forward pass.

    check_prompt_lengths(lm, dataset, trials, max_trials=None)

Past its context a model either fails deep inside (GPT-2's position table:
``IndexError``) or, with rotary positions, runs on without complaint on
positions it never saw in training, which silently changes every number. The
check tokenizes each prompt a run will use, answer included (the longest
sequence any stage feeds the model), and compares the longest with the limit.
"""

from __future__ import annotations

from typing import Optional

from fvkit.errors import DataError
from fvkit.method.fixed_trials import CAPPED_STAGES, STAGES
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.stage_inputs import n_used, trial_prompt

#: Config fields that hold a model's context length, in the order they are trusted.
CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length")


class PromptTooLongError(DataError):
    """A prompt does not fit in the model's context."""


def context_limit(model) -> Optional[int]:
    """The longest input the model's position scheme was built for, or None when unknown."""
    config = getattr(model, "config", None)
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def longest_prompt(lm, dataset, trials, max_trials=None, template: Template = DEFAULT_TEMPLATE) -> tuple:
    """(tokens, stage, trial index) of the longest prompt-plus-answer a run feeds the model."""
    best = (0, None, None)
    for stage in STAGES:
        cap = max_trials if stage in CAPPED_STAGES else None
        for i in range(n_used(trials.n_items(stage), cap)):
            data, text = trial_prompt(lm, dataset, trials, stage, i, template)
            n = len(lm.tokenizer(text + data["query_target"]["output"]).input_ids)
            if n > best[0]:
                best = (n, stage, i)
    return best


def check_prompt_lengths(lm, dataset, trials, max_trials=None, template: Template = DEFAULT_TEMPLATE) -> None:
    limit = context_limit(lm.model)
    if limit is None:
        return
    n, stage, i = longest_prompt(lm, dataset, trials, max_trials, template)
    if n > limit:
        raise PromptTooLongError(
            f"prompt {stage}[{i}] of trials {trials.id} is {n} tokens, longer than the {limit}-token context of "
            f"{lm.name}; use fewer shots (`fvkit trials --n-shots ...`) or a dataset with shorter rows")
