"""Injecting a function vector and evaluating it (gate M4b).

    with inject(lm, layer=3, vector=fv) as guard:
        logits = lm.model(**inputs).logits
    guard.fired                                   # 1

    res = evaluate(lm, dataset, trials, "zero_shot", fv, edit_layer=3)
    res["intervention_topk"]                      # [[1, acc], [2, acc], [3, acc]]

The vector is added to the output hidden state of block ``layer`` at the last
position. A block may return a tensor or a tuple whose first item is the hidden
state (transformers changed this between releases); both work. An injection
that did not change the model's output raises instead of reporting numbers.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from fvkit.models import adapters
from fvkit.errors import FvkitError
from fvkit.progress import progress
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.stage_inputs import answer_ids, n_used, trial_prompt
from fvkit.models.placement import to_like
from fvkit.models.tracer import Trace, first_tensor, replace_first_tensor

EVAL_STAGES = ("zero_shot", "shuffled")
TOP_K = (1, 2, 3)


@contextlib.contextmanager
def inject(lm, layer: int, vector: torch.Tensor, position: int = -1):
    adapters.check_layer(lm.model, lm.spec, layer)
    vec = vector.reshape(1, lm.dims.hidden_size)

    def add(output):
        hidden = first_tensor(output).clone()
        hidden[:, position] += to_like(vec, hidden)  # the block's device and dtype, wherever it runs
        return replace_first_tensor(output, hidden)

    name = adapters.block_name(lm.spec, layer)
    with Trace(lm.model, name, retain_output=False, edit_output=add) as trace:
        yield trace
    if trace.fired == 0:
        raise FvkitError(f"the injection hook on {name} never ran; the spec's blocks_path is not on the forward path")


def token_rank(logits: torch.Tensor, target_id: int) -> int:
    """0-based rank of ``target_id`` among the logits (the reference's argsort ordering)."""
    row = logits.squeeze()
    value = row[target_id]
    if int((row == value).sum()) == 1:
        # No other token shares the target's logit: a descending sort puts exactly the
        # larger ones before it, which counting finds without sorting the vocabulary.
        return int((row > value).sum())
    return torch.where(torch.argsort(row, descending=True) == target_id)[0].item()


def topk_accuracy(ranks: list) -> list:
    arr = np.asarray(ranks)
    return [[k, float((arr < k).sum() / len(arr))] for k in TOP_K]


def last_position_logits(output) -> torch.Tensor:
    """The logits at the last position, as a tensor of their own.

    ``logits[:, -1, :]`` alone would be a view that keeps the whole
    ``(rows, tokens, vocabulary)`` tensor alive (about 20 MB for a 100-token
    prompt and a 50k vocabulary) through the next forward pass; the copy holds
    the same numbers.
    """
    return output.logits[:, -1, :].clone()


def edited_logits(lm, inputs, layer: int, fv: torch.Tensor) -> torch.Tensor:
    """Last-position logits of ``inputs`` with ``fv`` added to block ``layer``'s output."""
    with inject(lm, layer, fv):
        return last_position_logits(lm.model(**inputs))


def evaluate(lm, dataset, trials, stage: str, fv: torch.Tensor, edit_layer: int,
             template: Template = DEFAULT_TEMPLATE, max_items=None, show_progress: bool = True) -> dict:
    """Clean and intervened ranks of each item's first target token."""
    if stage not in EVAL_STAGES:
        raise FvkitError(f"unknown evaluation stage '{stage}'; use one of {', '.join(EVAL_STAGES)}")
    adapters.check_layer(lm.model, lm.spec, edit_layer)
    clean, edited, max_change = [], [], 0.0
    n = n_used(trials.n_items(stage), max_items)
    with torch.no_grad():
        for j in progress(range(n), desc=f"eval {stage}", enabled=show_progress):
            data, text = trial_prompt(lm, dataset, trials, stage, j, template)
            target = answer_ids(lm.tokenizer, text, data["query_target"]["output"])[0]
            inputs = lm.tokenizer([text], return_tensors="pt")
            clean_logits = last_position_logits(lm.model(**inputs))
            edit_logits = edited_logits(lm, inputs, edit_layer, fv)
            change = (edit_logits - clean_logits).abs().max().item()
            if change == 0.0:
                raise FvkitError(
                    f"injecting the function vector at layer {edit_layer} did not change the output "
                    f"(item {j} of {stage}); the vector is zero or the edit was lost"
                )
            max_change = max(max_change, change)
            clean.append(token_rank(clean_logits, target))
            edited.append(token_rank(edit_logits, target))
    return {
        "clean_rank_list": clean,
        "intervention_rank_list": edited,
        "clean_topk": topk_accuracy(clean),
        "intervention_topk": topk_accuracy(edited),
        "n_items": n,
        "edit_layer": edit_layer,
        "max_abs_logit_change": max_change,
    }


def evaluate_baseline(lm, dataset, trials, template: Template = DEFAULT_TEMPLATE,
                      max_items=None, show_progress: bool = True) -> dict:
    """Clean n-shot ranks, read (as the reference does) from a pass over prompt + answer."""
    ranks, nlls = [], []
    n = n_used(trials.n_items("baseline"), max_items)
    tok = lm.tokenizer
    with torch.no_grad():
        for j in progress(range(n), desc="eval baseline", enabled=show_progress):
            data, text = trial_prompt(lm, dataset, trials, "baseline", j, template)
            answer = data["query_target"]["output"]
            target = answer_ids(tok, text, answer)[0]
            prompt_len = len(tok([text]).input_ids[0])
            full = tok([text + answer], return_tensors="pt")
            labels = full.input_ids.clone()
            answer_len = labels.shape[1] - prompt_len
            labels[:, :-answer_len] = -100
            out = lm.model(**full, labels=labels)
            nlls.append(out.loss.item())
            ranks.append(token_rank(out.logits[:, prompt_len - 1, :], target))
            del out  # its logits cover the whole prompt; not kept through the next pass
    return {
        "clean_rank_list": ranks,
        "clean_topk": topk_accuracy(ranks),
        "clean_ppl": float(np.exp(nlls).mean()),
        "n_items": n,
    }
