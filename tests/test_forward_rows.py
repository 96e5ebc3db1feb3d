"""The cached evaluation's rows from one model call: the block replay's numbers, or a refusal.

:func:`fvkit.fast.forward_rows.forward_rows` runs the last token once through
the whole model, one batch row per evaluated layer plus a clean row, instead of
a capture pass and a block-by-block replay. Its rows must be the replay's to
float32 rounding on every architecture whose cache it can answer from; it must
be the path actually taken there (or the speed-up is unproven); and a model whose
clean row does not reproduce the whole-prompt pass must be refused, with a
warning, and evaluated by the replay with the same ranks. Several prompts of
different lengths in one call (:func:`~fvkit.fast.forward_rows.group_rows`) must
each get the rows they get alone: a prompt that saw another's prefix, padding or
position would be off by O(1).
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
#: Prompts of three lengths for one call: the longest gives the mask its size, the others are left-padded.
GROUP = (PROMPT, "Q: wet\nA:", "Q: fast\nA: slow\n\nQ: light\nA:")

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
            rows = fr.forward_rows(lm, inputs, prefix, fv, layers)
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


def _group(lm, texts):
    items, cleans = [], []
    for text in texts:
        inputs = lm.tokenizer([text], return_tensors="pt")
        clean, prefix, _ = clean_pass(lm, inputs)
        items.append((inputs, prefix))
        cleans.append(clean)
    return items, cleans


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_prompts_in_one_call_get_the_rows_they_get_alone(alias, zoo_model):
    lm = zoo_model(alias)
    fv = vector(lm)
    layers = list(range(lm.dims.n_layers))
    with torch.no_grad():
        items, cleans = _group(lm, GROUP)
        assert len({prefix.length for _, prefix in items}) == len(GROUP)
        try:
            grouped = fr.group_rows(lm, items, fv, layers)
        except fr.NoCacheUpdate:
            pytest.skip(f"{alias} returns a legacy tuple cache in this release: the block replay is its way")
        alone = [fr.forward_rows(lm, inputs, prefix, fv, layers) for inputs, prefix in items]
    for text, rows, own, clean in zip(GROUP, grouped, alone, cleans):
        scale = float(own.abs().max())
        drift = float((rows - own).abs().max()) / scale
        assert drift <= ROWS_REL_TOL, (f"{alias}, prompt {text!r}: rows in a group {drift:.2e} from its own call's, "
                                       f"allowed {ROWS_REL_TOL:.0e}")
        fr.check_clean_row(rows[-1], clean)


def test_a_prompt_at_the_longest_ones_position_is_caught(zoo_model, monkeypatch):
    """Without their own positions, the shorter prompts' rows run at the longest one's: refused."""
    lm = zoo_model("tiny-llama")
    original = fr._row_inputs

    def same_position(*args):
        inputs = original(*args)
        inputs.pop("position_ids")
        return inputs

    monkeypatch.setattr(fr, "_row_inputs", same_position)
    with torch.no_grad():
        items, cleans = _group(lm, GROUP)
        grouped = fr.group_rows(lm, items, vector(lm), [0, 1])
    refused = []
    for rows, clean in zip(grouped, cleans):
        try:
            fr.check_clean_row(rows[-1], clean)
        except fr.ReplayUnsupported as err:
            refused.append(str(err))
    assert len(refused) == len(GROUP) - 1 and all("whole prompt's" in r for r in refused)


@pytest.mark.parametrize("alias", ("tiny-llama", "tiny-gemma"))
def test_the_cached_evaluation_takes_the_one_call_path(alias, zoo_model, antonym, antonym_trials, monkeypatch):
    lm = zoo_model(alias)
    monkeypatch.setattr(ev, "_FORWARD_REFUSED", type(ev._FORWARD_REFUSED)())
    calls = []
    original = ev.group_rows
    monkeypatch.setattr(ev, "group_rows", lambda *a, **k: calls.append(len(a[1])) or original(*a, **k))
    monkeypatch.setattr(ev, "capture_last_token", lambda *a, **k: pytest.fail("the block replay ran"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = cached_stage(lm, antonym, antonym_trials, "shuffled", vector(lm), [0, 1], DEFAULT_TEMPLATE, 4,
                           show_progress=False, budget=1 << 40)
    assert calls == [4] and ev.forward_refusal(lm.model) is None
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


@pytest.mark.parametrize("sizes,budget,expected", [
    ([3, 3, 3, 3], 7, [[0, 1], [2, 3]]),          # two fit, the third would not
    ([9, 1, 1], 7, [[0], [1, 2]]),                # a prompt over the budget runs alone
    ([1] * 10, 100, [list(range(8)), [8, 9]]),    # never more than MAX_PROMPTS_PER_CALL
    ([], 7, []),
])
def test_prompt_groups_stay_within_the_memory_budget(sizes, budget, expected, monkeypatch):
    monkeypatch.setattr(ev, "held_bytes", lambda lm, n_tokens, n_rows, record=True: n_tokens)
    monkeypatch.setattr(ev, "MAX_PROMPTS_PER_CALL", 8)
    ran = []
    groups = ev.PromptGroups(None, 31, ran.append, budget=budget)
    for i, size in enumerate(sizes):
        groups.add(i, size)
    groups.flush()
    assert ran == expected


def test_held_bytes_counts_the_record_keys_and_logits(zoo_model):
    lm = zoo_model("tiny-llama")
    d = lm.dims
    inputs = lm.tokenizer([PROMPT], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        _, prefix, record = clean_pass(lm, inputs)
        rows = fr.forward_rows(lm, inputs, prefix, vector(lm), [0, 1])
    cache = prefix.stored()
    empty = torch.zeros(1, d.n_kv_heads, 0, d.head_dim)
    keys = sum(t.numel() * t.element_size() for layer in range(d.n_layers)
               for t in cache.update(empty, empty, layer))      # the layer's keys and values, as held
    held = sum(record.output(i).numel() * 4 for i in range(d.n_layers)) + keys + rows.numel() * 4
    # Positions: the record holds all n, the prefix n - 1; the estimate counts n for both.
    assert held <= ev.held_bytes(lm, n, 3) <= held * 1.1
