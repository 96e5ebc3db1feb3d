"""The prompt of one trial of one stage, as a given model's spec wants it.

    data, text = trial_prompt(lm, dataset, trials, "indirect_effect", 0)
    target_ids = answer_ids(lm.tokenizer, text, data["query_target"]["output"])
"""

from __future__ import annotations

from fvkit.errors import DataError
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template, build_prompt_data, prompt_string


def bos_text_for(spec):
    """The text written before the prompt: none when the tokenizer adds BOS itself."""
    return None if spec.prepend_bos else spec.bos_text


def trial_prompt(lm, dataset, trials, stage: str, i: int, template: Template = DEFAULT_TEMPLATE) -> tuple:
    demos, query = trials.pairs(stage, i, dataset)
    data = build_prompt_data(demos, query, template, bos_text_for(lm.spec))
    return data, prompt_string(data)


def answer_ids(tokenizer, prompt: str, answer: str) -> list:
    """Token ids the answer adds after the prompt, tokenized in context."""
    source = tokenizer(prompt).input_ids
    target = tokenizer(prompt + answer).input_ids
    if not len(source) < len(target):
        raise DataError(f"answer {answer!r} adds no token after the prompt; check the dataset's output column")
    return target[len(source):]


def n_used(total: int, max_items) -> int:
    """How many of ``total`` trials or items a run uses (the first ``max_items``)."""
    if max_items is None:
        return total
    if max_items < 1:
        raise DataError(f"--max-trials must be at least 1, got {max_items}")
    return min(total, max_items)
