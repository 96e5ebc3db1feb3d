"""The cached evaluation gives the whole-prompt evaluation's ranks, at the edit layer and on few-shot prompts."""

import pytest
import torch

import fvkit.fast.evaluation as ev
from fvkit.fast.replay import ReplayUnsupported
from fvkit.fast.run_evaluations import run_baseline, run_evaluations
from fvkit.method.intervene import EVAL_STAGES, edited_logits, evaluate, evaluate_baseline, token_rank
from fvkit.method.stage_inputs import answer_ids, trial_prompt

#: Models of two families (GPT-2 blocks, Llama blocks with rotary positions and grouped heads).
MODELS = ("tiny-gpt2", "tiny-llama")
EDIT_LAYER = 1
RANK_KEYS = ("clean_rank_list", "intervention_rank_list", "clean_topk", "intervention_topk", "n_items", "edit_layer")


def vector(lm, seed=0, scale=3.0):
    """A fixed random vector, large enough to move the ranks of these tiny models."""
    return torch.randn(1, lm.dims.hidden_size, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("alias", MODELS)
def test_cached_evaluation_equals_whole_prompt_evaluation(alias, zoo_model, antonym, antonym_trials):
    lm = zoo_model(alias)
    fv = vector(lm)
    evals = run_evaluations(lm, antonym, antonym_trials, fv, EDIT_LAYER, show_progress=False)
    assert evals.info["method"] == "cached"
    for stage in EVAL_STAGES:
        exact = evaluate(lm, antonym, antonym_trials, stage, fv, EDIT_LAYER, show_progress=False)
        mine = getattr(evals, stage)
        assert {k: mine[k] for k in RANK_KEYS} == {k: exact[k] for k in RANK_KEYS}
        # Re-runs happen exactly at the near ties the policy resolves.
        assert evals.info[f"{stage}_near_tie_reruns"] == evals.info[f"{stage}_near_ties"]


def test_report_policy_counts_ties_and_differs_at_most_there(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-llama")
    fv = vector(lm)
    evals = run_evaluations(lm, antonym, antonym_trials, fv, EDIT_LAYER, ties="report", show_progress=False)
    for stage in EVAL_STAGES:
        exact = evaluate(lm, antonym, antonym_trials, stage, fv, EDIT_LAYER, show_progress=False)
        differ = sum(a != b for a, b in zip(getattr(evals, stage)["intervention_rank_list"],
                                            exact["intervention_rank_list"]))
        assert evals.info[f"{stage}_near_tie_reruns"] == 0
        assert differ <= evals.info[f"{stage}_near_ties"]


def test_vector_at_the_wrong_layer_is_caught(zoo_model, antonym, antonym_trials, monkeypatch):
    lm = zoo_model("tiny-llama")
    fv = vector(lm)
    exact = evaluate(lm, antonym, antonym_trials, "shuffled", fv, EDIT_LAYER, show_progress=False)
    original = ev.group_edited_rows
    monkeypatch.setattr(ev, "group_edited_rows", lambda lm_, items, vec, layers, reuse=True:
                        original(lm_, items, vec, [L + 1 for L in layers], reuse))
    evals = run_evaluations(lm, antonym, antonym_trials, fv, EDIT_LAYER, show_progress=False)
    assert evals.shuffled["intervention_rank_list"] != exact["intervention_rank_list"]


@pytest.mark.parametrize("alias", MODELS)
def test_few_shot_with_the_vector_from_the_same_pass(alias, zoo_model, antonym, antonym_trials):
    lm = zoo_model(alias)
    fv = vector(lm)
    base, info = run_baseline(lm, antonym, antonym_trials, fv, EDIT_LAYER, show_progress=False)
    exact = evaluate_baseline(lm, antonym, antonym_trials, show_progress=False)
    assert info["method"] == "cached"
    assert {k: base[k] for k in exact} == exact          # clean ranks and perplexity untouched
    for j in range(5):                                   # the vector's ranks as a whole-prompt pass gives them
        data, text = trial_prompt(lm, antonym, antonym_trials, "baseline", j)
        target = answer_ids(lm.tokenizer, text, data["query_target"]["output"])[0]
        logits = edited_logits(lm, lm.tokenizer([text], return_tensors="pt"), EDIT_LAYER, fv)
        assert base["intervention_rank_list"][j] == token_rank(logits, target)


def test_a_model_that_cannot_be_replayed_falls_back_to_whole_prompts(zoo_model, antonym, antonym_trials,
                                                                     monkeypatch):
    lm = zoo_model("tiny-gpt2")
    fv = vector(lm)

    def refuse(*args, **kwargs):
        raise ReplayUnsupported("block 0 keeps state outside its cache")

    monkeypatch.setattr(ev, "capture_last_token", refuse)
    monkeypatch.setattr(ev, "group_rows", refuse)   # neither the one-call rows nor the block replay
    monkeypatch.setattr(ev, "_FORWARD_REFUSED", type(ev._FORWARD_REFUSED)())
    with pytest.warns(UserWarning, match="in one call"):
        evals = run_evaluations(lm, antonym, antonym_trials, fv, EDIT_LAYER, show_progress=False)
    base, info = run_baseline(lm, antonym, antonym_trials, fv, EDIT_LAYER, show_progress=False)
    assert evals.info["method"] == "exact" and "outside its cache" in evals.info["fallback_reason"]
    assert info["method"] == "exact" and "intervention_rank_list" not in base
    exact = evaluate(lm, antonym, antonym_trials, "zero_shot", fv, EDIT_LAYER, show_progress=False)
    assert evals.zero_shot == exact


def test_bad_policy_and_method_are_one_clear_error(zoo_model, antonym, antonym_trials):
    from fvkit.errors import FvkitError

    lm = zoo_model("tiny-gpt2")
    with pytest.raises(FvkitError, match="unknown near-tie policy 'maybe'"):
        run_evaluations(lm, antonym, antonym_trials, vector(lm), EDIT_LAYER, ties="maybe", show_progress=False)
    with pytest.raises(FvkitError, match="unknown evaluation method 'quick'"):
        run_evaluations(lm, antonym, antonym_trials, vector(lm), EDIT_LAYER, method="quick", show_progress=False)
