"""The cached evaluation's rows from one model call: the block replay's numbers, or a refusal.

:func:`fvkit.fast.forward_rows.forward_rows` runs the last token once through
the whole model, one batch row per evaluated layer plus a clean row, instead of
a capture pass and a block-by-block replay. Its rows must be the replay's to
float32 rounding on every architecture whose cache it can answer from; it must
be the path actually taken there (or the speed-up is unproven); and a model whose
clean row does not reproduce the whole-prompt pass must be refused, with a
warning, and evaluated by the replay with the same ranks.
"""

import warnings

import pytest
import torch

from fvkit.fast import evaluation as ev
from fvkit.fast import forward_rows as fr
from fvkit.fast.evaluation import cached_stage, clean_pass, replayed_rows
from fvkit.method.intervene import evaluate
from fvkit.method.prompts import DEFAULT_TEMPLATE
from fvkit.models.zoo import TINY_PARITY_MODELS

PROMPT = "Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:"

#: Largest difference between the one-call rows and the replayed ones, as a fraction of the
#: largest |logit|: both are float32 one-token computations of the same numbers, a few ulps
#: (1e-7..1e-6) apart; a vector at another layer or row moves logits by 1e-2..1.
ROWS_REL_TOL = 1e-5


def vector(lm, scale=5.0):
    return torch.randn(lm.dims.hidden_size, generator=torch.Generator().manual_seed(1)) * scale


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_one_call_rows_equal_the_block_replay(alias, zoo_model, monkeypatch):
    lm = zoo_model(alias)
    fv = vector(lm)
    layers = list(range(lm.dims.n_layers))
    inputs = lm.tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        clean, prefix, _ = clean_pass(lm, inputs)
        try:
            rows = fr.forward_rows(lm, inputs, prefix, fv, layers, reuse=False)
        except fr.NoCacheUpdate:
            pytest.skip(f"{alias} returns a legacy tuple cache in this release: the block replay is its way")
        replayed = replayed_rows(lm, inputs, prefix, fv, layers)
    scale = float(replayed.abs().max())
    drift = float((rows - replayed).abs().max()) / scale
    assert rows.shape == replayed.shape == (len(layers) + 1, replayed.shape[-1])
    assert drift <= ROWS_REL_TOL, f"{alias}: one-call rows {drift:.2e} from the replay's, allowed {ROWS_REL_TOL:.0e}"
    fr.check_clean_row(rows[-1], clean)
    # Each layer's row carries the vector at its own layer: rows of different layers differ.
    assert all(float((rows[i] - rows[-1]).abs().max()) > 0 for i in range(len(layers)))


@pytest.mark.parametrize("alias", ("tiny-llama", "tiny-gemma"))
def test_the_cached_evaluation_takes_the_one_call_path(alias, zoo_model, antonym, antonym_trials, monkeypatch):
    lm = zoo_model(alias)
    monkeypatch.setattr(ev, "_FORWARD_REFUSED", type(ev._FORWARD_REFUSED)())
    calls = []
    original = ev.forward_rows
    monkeypatch.setattr(ev, "forward_rows", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(ev, "capture_last_token", lambda *a, **k: pytest.fail("the block replay ran"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = cached_stage(lm, antonym, antonym_trials, "shuffled", vector(lm), [0, 1], DEFAULT_TEMPLATE, 4,
                           show_progress=False)
    assert len(calls) == 4 and ev.forward_refusal(lm.model) is None
    exact = evaluate(lm, antonym, antonym_trials, "shuffled", vector(lm), 1, show_progress=False)
    assert res["intervention_rank_lists"][1] == exact["intervention_rank_list"][:4]


def test_a_wrong_clean_row_is_refused_and_the_replay_gives_the_ranks(zoo_model, antonym, antonym_trials,
                                                                     monkeypatch):
    lm = zoo_model("tiny-llama")
    fv = vector(lm)
    monkeypatch.setattr(ev, "_FORWARD_REFUSED", type(ev._FORWARD_REFUSED)())
    # The vector added to every row, the clean one included: plausible rows, a wrong baseline.
    monkeypatch.setattr(fr, "_adder", lambda row, vec: (lambda output: fr.replace_first_tensor(
        output, fr.first_tensor(output) + vec.reshape(1, 1, -1) / 4)))
    with pytest.warns(UserWarning, match="in one call"):
        res = cached_stage(lm, antonym, antonym_trials, "shuffled", fv, [1], DEFAULT_TEMPLATE, 4,
                           show_progress=False)
    assert "whole prompt's" in ev.forward_refusal(lm.model)
    exact = evaluate(lm, antonym, antonym_trials, "shuffled", fv, 1, show_progress=False)
    assert res["intervention_rank_lists"][0] == exact["intervention_rank_list"][:4]
