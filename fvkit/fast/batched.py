"""Evaluation prompts run several at a time: right padding, one pass per batch and condition.

    res = batched_stage(lm, dataset, trials, "zero_shot", fv, layers=[6], template, n=65, batch_size=16)
    res["clean_rank_list"], res["intervention_rank_lists"][0]   # ranks with the vector at layer 6
    res["near_ties"], res["near_tie_reruns"]                    # reads within batching noise of a tie

Prompts of different lengths share a batch padded on the right. A causal
model's real tokens never attend to a later position, so what follows a prompt
in its row changes nothing its tokens compute, and every real token keeps the
position it has alone (left padding would shift the positions of all the
shorter prompts, which then need position ids of their own). The attention mask
marks the padding, each prompt's answer is read at its own last real token, and
the vector is added to the output of block ``L`` at that token.

A batch computes the same numbers through larger matrix products, whose
rounding differs from one prompt at a time by float32 noise. A rank can only
move if another token's logit lies within that noise of the target's (a *near
tie*). ``ties="report"`` keeps the batched rank and counts the read;
``ties="rerun"`` re-runs it alone as a whole prompt, as
:func:`fvkit.method.intervene.evaluate` does, so the rank lists equal the
unbatched ones. Each layer costs one pass over every batch, so this method pays
off where a pass over many prompts costs little more than one (a GPU, short
prompts); the cached method (:mod:`fvkit.fast.evaluation`) needs fewer passes.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from fvkit.errors import FvkitError
from fvkit.fast.evaluation import near_tie
from fvkit.method.intervene import edited_logits, last_position_logits, token_rank
from fvkit.method.run_defaults import DEFAULT_EVAL_BATCH_SIZE, TIE_POLICIES
from fvkit.method.stage_inputs import answer_ids, trial_prompt
from fvkit.models import adapters
from fvkit.models.placement import to_like
from fvkit.models.tracer import EditInput, Trace, first_tensor, replace_first_tensor
from fvkit.progress import progress

#: A batched read is a near tie when another token's logit lies within this
#: fraction of the row's largest |logit| of the target's. A prompt's batched and
#: single-prompt logits differed by at most 9e-7 of the largest |logit| on the zoo
#: models, not at all on SmolLM2-135M and by 4.8e-6 on Gemma 3 270M (zero-shot and
#: 10-shot prompts mixed in batches of 4 to 16, clean and with the vector;
#: tests/test_batched_evaluation.py holds every zoo model to half this bound).
#: Both sides of a tie may move; 5e-5 leaves a tenfold margin over the worst seen,
#: while a wrong position or a lost edit moves logits by their own size.
BATCH_TIE_REL = 5e-5


def _near_tie(logits: torch.Tensor, target: int) -> bool:
    # near_tie allows twice its bound (both sides may move); BATCH_TIE_REL already covers both.
    return near_tie(logits, target, BATCH_TIE_REL / 2 * logits.abs().max().item())


def pad_right(lm, encodings: list) -> tuple:
    """(input_ids, attention_mask, index of each prompt's last real token) of one batch."""
    pad = lm.tokenizer.pad_token_id
    pad = pad if pad is not None else (lm.tokenizer.eos_token_id or 0)
    lengths = [len(e) for e in encodings]
    width = max(lengths)
    ids = torch.full((len(encodings), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encodings), width), dtype=torch.long)
    for row, e in enumerate(encodings):
        ids[row, :len(e)] = torch.tensor(e, dtype=torch.long)
        mask[row, :len(e)] = 1
    return ids, mask, torch.tensor(lengths) - 1


def _at_last(last: torch.Tensor):
    """Let the output head read only each row's last real token."""
    def pick(x):
        if x.dim() != 3:
            return x
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, last.to(x.device)].unsqueeze(1)
    return pick


def batch_logits(lm, ids, mask, last, layer: Optional[int] = None, vec: Optional[torch.Tensor] = None):
    """(batch, vocabulary) logits at each prompt's last real token; with ``layer``, ``vec`` is added
    to block ``layer``'s output at that token."""
    model, spec = lm.model, lm.spec
    head = adapters.resolve_lm_head(model, spec)
    edits = []
    if layer is not None:
        def add(output):
            hidden = first_tensor(output).clone()
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            hidden[rows, last.to(hidden.device)] += to_like(vec.reshape(1, -1), hidden)
            return replace_first_tensor(output, hidden)
        edits.append(Trace(model, adapters.block_name(spec, layer), retain_output=False, edit_output=add))
    with contextlib.ExitStack() as stack:
        stack.enter_context(EditInput(head, _at_last(last)))
        for edit in edits:
            stack.enter_context(edit)
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    if edits and edits[0].fired != 1:
        raise FvkitError(f"the injection hook on block {layer} ran {edits[0].fired} times in a batched pass, "
                         f"expected once")
    return last_position_logits(out)


def batched_stage(lm, dataset, trials, stage: str, fv: torch.Tensor, layers: Sequence[int], template,
                  n: int, batch_size: int = DEFAULT_EVAL_BATCH_SIZE, ties: str = "rerun",
                  show_progress: bool = True, desc: Optional[str] = None) -> dict:
    """Clean ranks and, per layer of ``layers``, edited ranks of the first ``n`` items of ``stage``,
    in the layout of :func:`fvkit.fast.evaluation.cached_stage`."""
    if ties not in TIE_POLICIES:
        raise FvkitError(f"unknown near-tie policy '{ties}'; use one of {', '.join(TIE_POLICIES)}")
    if batch_size < 1:
        raise FvkitError(f"the evaluation batch size must be at least 1, got {batch_size}")
    layers = list(layers)
    for layer in layers:
        adapters.check_layer(lm.model, lm.spec, layer)
    tok = lm.tokenizer
    clean, edited, changes = [], [[] for _ in layers], [0.0] * len(layers)
    n_ties = reruns = 0
    starts = range(0, n, batch_size)
    with torch.no_grad():
        for start in progress(starts, desc=desc or f"eval {stage} (batched)", enabled=show_progress):
            items = range(start, min(start + batch_size, n))
            texts, targets, encodings = [], [], []
            for j in items:
                data, text = trial_prompt(lm, dataset, trials, stage, j, template)
                texts.append(text)
                targets.append(answer_ids(tok, text, data["query_target"]["output"])[0])
                encodings.append(tok([text]).input_ids[0])  # each prompt's tokens exactly as alone
            ids, mask, last = pad_right(lm, encodings)
            base = batch_logits(lm, ids, mask, last)

            def read(row, logits, rerun):
                nonlocal n_ties, reruns
                if not _near_tie(logits, targets[row]):
                    return logits
                n_ties += 1
                if ties == "report":
                    return logits
                reruns += 1
                return rerun(tok([texts[row]], return_tensors="pt"))

            clean_rows = [read(r, base[r], lambda inputs: last_position_logits(lm.model(**inputs)))
                          for r in range(len(items))]
            clean += [token_rank(c, t) for c, t in zip(clean_rows, targets)]
            for i, layer in enumerate(layers):
                out = batch_logits(lm, ids, mask, last, layer, fv)
                for r in range(len(items)):
                    change = (out[r] - base[r]).abs().max().item()
                    if change == 0.0:
                        raise FvkitError(f"injecting the function vector at layer {layer} did not change the "
                                         f"output; the vector is zero or the edit was lost")
                    changes[i] = max(changes[i], change)
                    row = read(r, out[r], lambda inputs, L=layer: edited_logits(lm, inputs, L, fv))
                    edited[i].append(token_rank(row, targets[r]))
    return {"clean_rank_list": clean, "intervention_rank_lists": edited, "max_abs_logit_change": changes,
            "cached_clean_max_abs_diff": 0.0, "near_ties": n_ties, "near_tie_reruns": reruns}
