"""Gate M3 fails when fvkit's fast path gives up its merged pass or its block replay because they
did not reproduce the clean run (fvkit.parity.fast_strategy): a stale or misplaced row is caught,
not recomputed away by the next strategy."""

import warnings

import pytest

import fvkit.fast.indirect_effect as fast
from fvkit.fast.replay import BlockCalls
from fvkit.method.activations import mean_head_activations
from fvkit.method.indirect_effect import TrialSetup
from fvkit.method.prompts import DEFAULT_TEMPLATE
from fvkit.method.token_labels import dummy_token_labels
from fvkit.parity.fast_strategy import fallback_check


@pytest.fixture
def one_trial(zoo_model, antonym, antonym_trials, monkeypatch):
    """Runs the fast path's ``auto`` strategy on tiny-llama's first trial, with fresh refusal tables."""
    monkeypatch.setattr(fast, "_BLOCKS_REFUSED", fast.weakref.WeakKeyDictionary())
    monkeypatch.setattr(fast, "_MERGED_REFUSED", fast.weakref.WeakKeyDictionary())
    lm = zoo_model("tiny-llama")
    mean = mean_head_activations(lm, antonym, antonym_trials, max_trials=1, show_progress=False)
    dummy = dummy_token_labels(antonym_trials.n_shots, lm.tokenizer, lm.spec.prepend_bos, lm.spec.bos_text)
    setup = TrialSetup.build(lm, antonym, antonym_trials, 0, dummy, DEFAULT_TEMPLATE)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fast.fast_trial(lm, setup, mean)
    return lm, run


def blocks_only(lm, monkeypatch):
    """``auto`` goes straight to the block replay, as for a model whose blocks the merged pass cannot extend."""
    monkeypatch.setitem(fast._MERGED_REFUSED, lm.model, fast.ReplayUnsupported("this test: blocks replay only"))


def test_the_merged_pass_passes(one_trial):
    lm, run = one_trial
    run()
    failures, row = fallback_check(lm)
    assert failures == [] and row.status == "PASS" and row.stage == "fast_strategy"
    assert row.detail.startswith("merged pass reproduced")


def test_the_block_replay_passes_where_the_merged_pass_cannot_extend_the_blocks(one_trial, monkeypatch):
    lm, run = one_trial
    blocks_only(lm, monkeypatch)
    run()
    failures, row = fallback_check(lm)
    assert failures == [] and row.status == "PASS"
    assert "blocks replay reproduced" in row.detail and "merged pass not used: this test" in row.detail


def test_a_misplaced_merged_row_fails_the_gate_instead_of_falling_back(one_trial, monkeypatch):
    """Rows given the second-to-last position: the unpatched row disagrees, ``auto`` computes the
    right effects with the block replay, and the gate names the disagreement."""
    import fvkit.fast.merged_pass as merged_pass

    lm, run = one_trial

    def second_to_last(t, axis, r):
        shape = list(t.shape)
        shape[axis] = r
        return merged_pass.torch.cat([t, t.narrow(axis, t.shape[axis] - 2, 1).expand(*shape)], dim=axis)

    monkeypatch.setattr(merged_pass, "_repeat_last", second_to_last)
    run()
    failures, row = fallback_check(lm)
    assert row.status == "FAIL" and fast.blocks_refusal(lm.model) is None
    (failure,) = failures
    assert "gave up carrying the rows in the prompt's pass" in failure and "unpatched row" in failure


def test_a_stale_replay_row_fails_the_gate_instead_of_falling_back(one_trial, monkeypatch):
    lm, run = one_trial
    blocks_only(lm, monkeypatch)
    real = BlockCalls.hidden
    # The replay hands out the row recorded for the layer above, the pass's unpatched row included.
    last = lm.dims.n_layers - 1
    monkeypatch.setattr(BlockCalls, "hidden", lambda self, layer: real(self, min(layer + 1, last)))
    run()  # the fallback still computes the effects...
    failures, row = fallback_check(lm)  # ...but the gate names the refusal
    assert row.status == "FAIL"
    (failure,) = failures
    assert "gave up its blocks replay and fell back to the whole-model strategy" in failure
    assert "the unpatched row's logits differ from the clean run's" in failure


def test_a_stale_row_the_unpatched_row_does_not_see_moves_the_effects(one_trial, monkeypatch, zoo_model, antonym,
                                                                     antonym_trials):
    """The mutation harness's stale_fast_row hands each layer the row recorded for the layer below;
    a pass's unpatched row joins at its first layer, where that is the right row, so no refusal is
    made, and what catches it is M3's comparison of the effects: they move by their own size."""
    from fvkit.fast.indirect_effect import FAST_VS_EXACT_REL_TOL, relative_drift
    from fvkit.pipeline import indirect_effects

    lm, run = one_trial
    blocks_only(lm, monkeypatch)
    mean = mean_head_activations(lm, antonym, antonym_trials, max_trials=1, show_progress=False)
    exact = indirect_effects(lm, antonym, antonym_trials, mean, max_trials=1, mode="exact", show_progress=False)[0]
    assert relative_drift(run(), exact) <= FAST_VS_EXACT_REL_TOL
    real = BlockCalls.hidden
    monkeypatch.setattr(BlockCalls, "hidden", lambda self, layer: real(self, max(layer - 1, 0)))
    stale = run()
    assert fallback_check(lm)[1].status == "PASS"
    assert relative_drift(stale, exact) > 100 * FAST_VS_EXACT_REL_TOL
