"""The layer sweep gives, layer for layer, exactly what evaluate() gives."""

import functools

import pytest
import torch

import fvkit.fast.evaluation as ev
import fvkit.fast.sweep as ls
from fvkit.errors import FvkitError
from fvkit.method.intervene import EVAL_STAGES, evaluate
from fvkit.fast.cache import UnsupportedCache
from fvkit.fast.sweep import layer_result, layer_sweep
from fvkit.models.zoo import TINY_PARITY_MODELS

#: Items per stage: enough for ranks to move, few enough to keep the test quick.
N_ITEMS = 2
#: max_abs_logit_change compares the one-token pass with a whole-prompt pass, so it
#: carries their float32 difference (~1e-5 on these models); ranks carry none.
LOGIT_CHANGE_ABS_TOL = 1e-3
EXACT_KEYS = ("clean_rank_list", "intervention_rank_list", "clean_topk", "intervention_topk", "n_items", "edit_layer")


def vector(lm, seed=0, scale=3.0):
    """A fixed random vector, large enough to move the ranks of these tiny models."""
    return torch.randn(1, lm.dims.hidden_size, generator=torch.Generator().manual_seed(seed)) * scale


def per_layer_evaluations(lm, ds, trials, fv):
    return {(stage, layer): evaluate(lm, ds, trials, stage, fv, layer, max_items=N_ITEMS, show_progress=False)
            for stage in EVAL_STAGES for layer in range(lm.dims.n_layers)}


def mismatches(sweep, evaluations):
    out = []
    for (stage, layer), ref in evaluations.items():
        mine = layer_result(sweep, stage, layer)
        out += [(stage, layer, k) for k in EXACT_KEYS if mine[k] != ref[k]]
        if abs(mine["max_abs_logit_change"] - ref["max_abs_logit_change"]) > LOGIT_CHANGE_ABS_TOL:
            out.append((stage, layer, "max_abs_logit_change"))
    return out


@pytest.fixture(scope="module")
def reference_runs(zoo_model, antonym, antonym_trials):
    """Per-layer evaluate() results, once per model."""
    @functools.cache
    def get(alias):
        lm = zoo_model(alias)
        return per_layer_evaluations(lm, antonym, antonym_trials, vector(lm))
    return get


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_sweep_equals_evaluate_at_every_layer(alias, zoo_model, antonym, antonym_trials, reference_runs):
    lm = zoo_model(alias)
    sweep = layer_sweep(lm, antonym, antonym_trials, vector(lm), max_items=N_ITEMS, show_progress=False)
    assert sweep["method"] == "cached"
    assert sweep["layers"] == list(range(lm.dims.n_layers))
    assert mismatches(sweep, reference_runs(alias)) == []
    for stage in EVAL_STAGES:
        s = sweep["stages"][stage]
        assert len(s["intervention_rank_lists"]) == lm.dims.n_layers
        assert 0 < s["cached_clean_max_abs_diff"] < LOGIT_CHANGE_ABS_TOL or s["cached_clean_max_abs_diff"] == 0
        assert sweep["best_layer"][stage] in sweep["layers"]


def test_a_vector_injected_at_the_wrong_layer_is_caught(zoo_model, antonym, antonym_trials, reference_runs,
                                                        monkeypatch):
    lm = zoo_model("tiny-llama")
    original = ev.group_edited_rows

    def shifted(lm_, items, vec, layers, reuse=True):
        return [torch.cat([rows[:-1].roll(1, dims=0), rows[-1:]])   # each layer reads its neighbour's row
                for rows in original(lm_, items, vec, layers, reuse)]

    monkeypatch.setattr(ev, "group_edited_rows", shifted)
    sweep = layer_sweep(lm, antonym, antonym_trials, vector(lm), max_items=N_ITEMS, show_progress=False)
    assert any(key == "intervention_rank_list" for *_, key in mismatches(sweep, reference_runs("tiny-llama")))


def test_near_ties_are_rerun_as_whole_prompts(zoo_model, antonym, antonym_trials, reference_runs, monkeypatch):
    lm = zoo_model("tiny-gpt2")
    # An enormous noise bound makes every row a near-tie: every rank then comes from a re-run.
    monkeypatch.setattr(ev, "TIE_NOISE_FACTOR", 1e9)
    sweep = layer_sweep(lm, antonym, antonym_trials, vector(lm), max_items=N_ITEMS, show_progress=False)
    assert all(s["near_tie_reruns"] == N_ITEMS * lm.dims.n_layers for s in sweep["stages"].values())
    assert mismatches(sweep, reference_runs("tiny-gpt2")) == []


def test_layers_in_several_batches_give_the_same_sweep(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-llama")
    fv = vector(lm)
    whole = layer_sweep(lm, antonym, antonym_trials, fv, max_items=N_ITEMS, show_progress=False)
    split = layer_sweep(lm, antonym, antonym_trials, fv, max_items=N_ITEMS, max_rows=1, show_progress=False)
    for stage in EVAL_STAGES:
        assert split["stages"][stage]["intervention_rank_lists"] == whole["stages"][stage]["intervention_rank_lists"]


def test_a_cache_that_cannot_be_reused_falls_back_to_whole_prompts(zoo_model, antonym, antonym_trials,
                                                                   reference_runs, monkeypatch):
    lm = zoo_model("tiny-gpt2")

    def refuse(*args, **kwargs):
        raise UnsupportedCache("cache of type Odd is not supported")

    monkeypatch.setattr(ev.PrefixCache, "from_output", refuse)
    sweep = layer_sweep(lm, antonym, antonym_trials, vector(lm), max_items=N_ITEMS, show_progress=False)
    assert sweep["method"] == "full" and "Odd" in sweep["fallback_reason"]
    assert mismatches(sweep, reference_runs("tiny-gpt2")) == []
    with pytest.raises(UnsupportedCache):
        layer_sweep(lm, antonym, antonym_trials, vector(lm), max_items=1, method="cached", show_progress=False)


def test_a_vector_that_changes_nothing_is_an_error(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-llama")
    with pytest.raises(FvkitError, match="did not change the output"):
        layer_sweep(lm, antonym, antonym_trials, torch.zeros(1, lm.dims.hidden_size), max_items=1,
                    show_progress=False)


def test_bad_arguments(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-llama")
    with pytest.raises(FvkitError, match="hidden size is 40"):
        layer_sweep(lm, antonym, antonym_trials, torch.ones(1, 7), show_progress=False)
    with pytest.raises(FvkitError, match="unknown layer-sweep method"):
        layer_sweep(lm, antonym, antonym_trials, vector(lm), method="fastest", show_progress=False)
    sweep = {"n_layers": 3, "stages": {"zero_shot": {}}}
    with pytest.raises(FvkitError, match="out of range"):
        layer_result(sweep, "zero_shot", 3)
    with pytest.raises(FvkitError, match="no stage 'baseline'"):
        layer_result(sweep, "baseline", 0)


def test_best_layer_prefers_top1_then_top2_then_earlier_layer():
    topks = [[[1, 0.5], [2, 0.6], [3, 0.7]], [[1, 0.5], [2, 0.7], [3, 0.7]], [[1, 0.5], [2, 0.7], [3, 0.7]]]
    assert ls._best_layer(topks) == 1
    topks.append([[1, 0.6], [2, 0.6], [3, 0.6]])
    assert ls._best_layer(topks) == 3
