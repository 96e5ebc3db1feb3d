"""Batched evaluation: prompts padded on the right give the unbatched ranks, except at reported near ties.

A prompt's row in a batch must compute what the prompt computes alone: padding
after it is invisible to its causal tokens, its positions are its own, and its
answer is read (and the vector added) at its own last token. The logits may
differ only by float32 rounding, which BATCH_TIE_REL bounds; a rank may differ
only where another token lies within that bound (a near tie), and then only
under ``ties="report"``.
"""

import pytest
import torch

import fvkit.fast.batched as batched
from fvkit.errors import FvkitError
from fvkit.fast.run_evaluations import run_evaluations
from fvkit.method.intervene import EVAL_STAGES, edited_logits, evaluate, last_position_logits
from fvkit.method.stage_inputs import trial_prompt
from fvkit.models.zoo import TINY_PARITY_MODELS

EDIT_LAYER = 1
#: Small enough that every stage's items fill several batches of different prompt lengths.
BATCH = 4
RANK_KEYS = ("clean_rank_list", "intervention_rank_list", "clean_topk", "intervention_topk", "n_items", "edit_layer")


def vector(lm, seed=0, scale=3.0):
    return torch.randn(1, lm.dims.hidden_size, generator=torch.Generator().manual_seed(seed)) * scale


def stage_texts(lm, dataset, trials, stage, n):
    return [trial_prompt(lm, dataset, trials, stage, j)[1] for j in range(n)]


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_a_prompt_in_a_padded_batch_computes_what_it_computes_alone(alias, zoo_model, antonym, antonym_trials):
    lm = zoo_model(alias)
    fv = vector(lm)
    texts = stage_texts(lm, antonym, antonym_trials, "shuffled", 6) + stage_texts(lm, antonym, antonym_trials,
                                                                                  "zero_shot", 2)
    encodings = [lm.tokenizer([t]).input_ids[0] for t in texts]
    assert len({len(e) for e in encodings}) > 1, "the batch must mix prompt lengths to test the padding"
    ids, mask, last = batched.pad_right(lm, encodings)
    with torch.no_grad():
        for layer in (None, EDIT_LAYER):
            got = batched.batch_logits(lm, ids, mask, last, layer, fv)
            for row, text in enumerate(texts):
                inputs = lm.tokenizer([text], return_tensors="pt")
                alone = (last_position_logits(lm.model(**inputs)) if layer is None
                         else edited_logits(lm, inputs, layer, fv))[0]
                gap = (got[row] - alone).abs().max().item() / alone.abs().max().item()
                assert gap <= batched.BATCH_TIE_REL / 2, (
                    f"{alias} row {row} (layer {layer}): batched logits are {gap:.2e} of the largest |logit| away "
                    f"from the prompt alone; allowed {batched.BATCH_TIE_REL / 2:.0e} (half the near-tie bound)")


@pytest.mark.parametrize("alias", ("tiny-gpt2", "tiny-llama", "tiny-gemma"))
def test_batched_ranks_equal_exact_ranks_with_ties_rerun(alias, zoo_model, antonym, antonym_trials):
    lm = zoo_model(alias)
    fv = vector(lm)
    evals = run_evaluations(lm, antonym, antonym_trials, fv, EDIT_LAYER, method="batched", batch_size=BATCH,
                            show_progress=False)
    assert evals.info["method"] == "batched" and evals.info["batch_size"] == BATCH
    for stage in EVAL_STAGES:
        exact = evaluate(lm, antonym, antonym_trials, stage, fv, EDIT_LAYER, show_progress=False)
        mine = getattr(evals, stage)
        assert {k: mine[k] for k in RANK_KEYS} == {k: exact[k] for k in RANK_KEYS}
        assert evals.info[f"{stage}_near_tie_reruns"] == evals.info[f"{stage}_near_ties"]


def test_reported_ties_are_the_only_places_ranks_may_differ(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-llama")
    fv = vector(lm)
    evals = run_evaluations(lm, antonym, antonym_trials, fv, EDIT_LAYER, method="batched", batch_size=BATCH,
                            ties="report", show_progress=False)
    for stage in EVAL_STAGES:
        exact = evaluate(lm, antonym, antonym_trials, stage, fv, EDIT_LAYER, show_progress=False)
        mine = getattr(evals, stage)
        differ = sum(a != b for key in ("clean_rank_list", "intervention_rank_list")
                     for a, b in zip(mine[key], exact[key]))
        assert evals.info[f"{stage}_near_tie_reruns"] == 0
        assert differ <= evals.info[f"{stage}_near_ties"]


def test_batched_sweep_equals_the_cached_sweep(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-gpt2")
    fv = vector(lm)
    cached = run_evaluations(lm, antonym, antonym_trials, fv, EDIT_LAYER, sweep=True, show_progress=False)
    batch = run_evaluations(lm, antonym, antonym_trials, fv, EDIT_LAYER, sweep=True, method="batched",
                            batch_size=BATCH, show_progress=False)
    assert batch.sweep["method"] == "batched"
    for stage in EVAL_STAGES:
        assert (batch.sweep["stages"][stage]["intervention_rank_lists"]
                == cached.sweep["stages"][stage]["intervention_rank_lists"])


def test_reading_another_position_than_the_last_token_is_caught(zoo_model, antonym, antonym_trials, monkeypatch):
    lm = zoo_model("tiny-llama")
    fv = vector(lm)
    original = batched.pad_right
    # What a left-padding or off-by-one mistake amounts to: the answer read one token early.
    monkeypatch.setattr(batched, "pad_right", lambda lm_, enc: (lambda i, m, last: (i, m, last - 1))(
        *original(lm_, enc)))
    evals = run_evaluations(lm, antonym, antonym_trials, fv, EDIT_LAYER, method="batched", batch_size=BATCH,
                            ties="report", show_progress=False)
    exact = evaluate(lm, antonym, antonym_trials, "shuffled", fv, EDIT_LAYER, show_progress=False)
    assert evals.shuffled["clean_rank_list"] != exact["clean_rank_list"]


def test_bad_batch_size_is_one_clear_error(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-llama")
    with pytest.raises(FvkitError, match="batch size must be at least 1"):
        batched.batched_stage(lm, antonym, antonym_trials, "zero_shot", vector(lm), [EDIT_LAYER], None, 2,
                              batch_size=0)
