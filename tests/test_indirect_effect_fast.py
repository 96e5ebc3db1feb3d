"""The fast indirect effect computes what the exact path computes, on every architecture."""

import functools
import warnings

import pytest
import torch

import fvkit.fast.indirect_effect as fast
import fvkit.fast.cache as kv_cache
import fvkit.fast.merged_pass as merged_pass
import fvkit.fast.replay as kv_replay
from fvkit.method.activations import mean_head_activations
from fvkit.errors import FvkitError
from fvkit.method.function_vector import select_top_heads
from fvkit.method.indirect_effect import TrialSetup, exact_trial
from fvkit.pipeline import indirect_effects
from fvkit.fast.indirect_effect import FAST_VS_EXACT_REL_TOL, batch_rows, fast_trial, relative_drift
from fvkit.fast.replay import ReplayUnsupported
from fvkit.method.prompts import DEFAULT_TEMPLATE
from fvkit.method.token_labels import dummy_token_labels
from fvkit.models import adapters
from fvkit.models.tracer import BeforeCall, first_tensor, replace_first_tensor
from fvkit.models.zoo import ZOO

#: Every tiny zoo model: one per architecture, plus Gemma with n_heads*head_dim != hidden.
#: Grouped-query attention: tiny-llama, tiny-mistral, tiny-qwen2, tiny-gemma(-hd);
#: biased out-projection: tiny-gpt2 (Conv1D), tiny-neox.
TINY = [alias for alias, entry in ZOO.items() if entry.source == "random"]


@pytest.fixture(scope="module")
def prepared(zoo_model, antonym, antonym_trials):
    """(lm, mean activations, exact effects of the first trial), once per model."""
    @functools.cache
    def get(alias):
        lm = zoo_model(alias)
        mean = mean_head_activations(lm, antonym, antonym_trials, max_trials=2, show_progress=False)
        exact = indirect_effects(lm, antonym, antonym_trials, mean, max_trials=1, mode="exact", show_progress=False)
        return lm, mean, exact

    return get


def capture_only(monkeypatch, lm):
    """The blocks' last-token calls recorded by a capture pass, not cut from the prompt's pass."""
    monkeypatch.setattr(fast, "_PROMPT_CALLS_REFUSED", fast.weakref.WeakKeyDictionary({lm.model: "this test"}))


def first_setup(lm, antonym, antonym_trials):
    dummy = dummy_token_labels(antonym_trials.n_shots, lm.tokenizer, lm.spec.prepend_bos, lm.spec.bos_text)
    return TrialSetup.build(lm, antonym, antonym_trials, 0, dummy, DEFAULT_TEMPLATE)


def n_top(lm) -> int:
    return min(10, lm.dims.n_layers * lm.dims.n_heads)


@pytest.mark.parametrize("alias", TINY)
def test_fast_matches_exact(prepared, antonym, antonym_trials, alias):
    lm, mean, exact = prepared(alias)
    assert exact.abs().max() > 0, "a model with no effect at all would make this comparison vacuous"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'auto' must not need its fallback on any zoo model
        ie = indirect_effects(lm, antonym, antonym_trials, mean, max_trials=1, mode="fast", show_progress=False)
    drift = relative_drift(ie, exact)
    assert drift <= FAST_VS_EXACT_REL_TOL, f"{alias}: fast drifts {drift:.2e} of the largest |IE|"
    assert select_top_heads(ie, n_top(lm)) == select_top_heads(exact, n_top(lm))


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-neox", "tiny-qwen2"])
def test_both_strategies_compute_the_same_numbers(prepared, antonym, antonym_trials, alias):
    lm, mean, exact = prepared(alias)
    setup = first_setup(lm, antonym, antonym_trials)
    by_blocks = fast_trial(lm, setup, mean, strategy="blocks")
    by_model = fast_trial(lm, setup, mean, strategy="model")
    assert relative_drift(by_model, exact[0]) <= FAST_VS_EXACT_REL_TOL
    # ``blocks`` reads the shared prefix in one product per head group, ``model`` runs the
    # model's eager attention on per-row copies (fvkit.fast.prefix_attention): float32
    # rounding apart, as each is from the exact path (measured 1.4-2.3e-6 here).
    assert relative_drift(by_blocks, by_model) <= FAST_VS_EXACT_REL_TOL


#: In float64 the two paths differ only by float64 rounding and by the float32 in
#: which both store effects (6e-8 of an entry). A semantic difference (a wrong
#: position, mask or row) shows at the 1e-3..1 level and float32 arithmetic at
#: ~1e-6, so this bound tells "same computation" apart from both.
FLOAT64_REL_TOL = 1e-7


# GPT-J is left out: its attention computes in float32 whatever the model's dtype.
#: Architectures whose blocks the merged pass cannot extend in some supported release: GPT-2's
#: blocks take the attention mask positionally (5.x) and its eager function gets no ``scaling``
#: (4.49); transformers 4.49 hands GPT-J's blocks their hidden state by keyword.
MERGED_MAY_REFUSE = {"tiny-gpt2", "tiny-gptj"}


def o_proj_widths(lm, layer: int = 0) -> "tuple[BeforeCall, list]":
    """A hook listing how many positions each call of an out-projection received."""
    widths = []
    hook = BeforeCall(adapters.resolve_out_proj(lm.model, lm.spec, layer),
                      on_call=lambda args, kwargs: widths.append(args[0].shape[-2]))
    return hook, widths


@pytest.mark.parametrize("alias", TINY)
def test_rows_carried_in_the_prompts_pass_give_the_exact_effects(prepared, antonym, antonym_trials, monkeypatch,
                                                                 alias):
    """The ``merged`` strategy multiplies the prompt's positions and the rows together in every
    block and gives the exact path's effects; where it cannot extend a block it is refused with
    the reason, and ``auto`` computes the same effects with ``blocks``."""
    lm, mean, exact = prepared(alias)
    monkeypatch.setattr(fast, "_MERGED_REFUSED", fast.weakref.WeakKeyDictionary())
    setup = first_setup(lm, antonym, antonym_trials)
    n_tokens = setup.inputs["input_ids"].shape[1]
    hook, widths = o_proj_widths(lm)
    try:
        with hook:
            ie = fast_trial(lm, setup, mean, strategy="merged")
    except ReplayUnsupported as err:
        assert alias in MERGED_MAY_REFUSE, f"{alias}: the merged pass was refused: {err}"
        ie = fast_trial(lm, setup, mean)
        assert fast.merged_refusal(lm.model) == str(err)
    else:
        # The first call is the merged pass: the prompt, the unpatched row and layer 0's rows, padded.
        assert widths[0] >= n_tokens + 1 + lm.dims.n_heads, (widths, n_tokens)
    drift = relative_drift(ie, exact[0])
    assert drift <= FAST_VS_EXACT_REL_TOL, f"{alias}: {drift:.2e} of the largest |IE|"


def test_a_model_that_mixes_positions_outside_attention_is_refused(prepared, antonym, antonym_trials, monkeypatch):
    """Rows carried as positions would change the prompt's own computation in a model whose blocks
    mix positions elsewhere than in attention; the first merged pass of a model is compared with a
    pass without rows, which shows it."""
    lm, mean, _ = prepared("tiny-llama")
    monkeypatch.setattr(fast, "_MERGED_CHECKED", fast.weakref.WeakKeyDictionary())
    block = adapters.resolve_blocks(lm.model, lm.spec)[0]

    def mix(module, args, output):  # adds a tenth of the mean over positions
        hidden = first_tensor(output)
        return replace_first_tensor(output, hidden + 0.1 * hidden.mean(dim=1, keepdim=True))

    handle = block.register_forward_hook(mix)
    try:
        with pytest.raises(ReplayUnsupported, match="mixes positions outside attention"):
            fast_trial(lm, first_setup(lm, antonym, antonym_trials), mean, strategy="merged")
    finally:
        handle.remove()


def test_rows_given_another_position_are_refused(prepared, antonym, antonym_trials, monkeypatch):
    """Rows extended with the second-to-last position's rotary embedding and ids compute another
    token; the unpatched row's logits show it."""
    lm, mean, _ = prepared("tiny-llama")

    def second_to_last(t, axis, r):
        shape = list(t.shape)
        shape[axis] = r
        return torch.cat([t, t.narrow(axis, t.shape[axis] - 2, 1).expand(*shape)], dim=axis)

    monkeypatch.setattr(merged_pass, "_repeat_last", second_to_last)
    with pytest.raises(ReplayUnsupported, match="unpatched row"):
        fast_trial(lm, first_setup(lm, antonym, antonym_trials), mean, strategy="merged")


def test_a_block_whose_attention_bypasses_the_merged_function_is_refused(prepared, antonym, antonym_trials,
                                                                          monkeypatch):
    """Attention that does not go through the replaced eager function would treat the rows as later
    prompt positions; the pass is refused, and ``auto`` uses ``blocks``."""
    lm, mean, exact = prepared("tiny-llama")
    monkeypatch.setattr(merged_pass, "modeling_modules", lambda blocks: [])
    monkeypatch.setattr(fast, "_MERGED_REFUSED", fast.weakref.WeakKeyDictionary())
    setup = first_setup(lm, antonym, antonym_trials)
    with pytest.raises(ReplayUnsupported):
        fast_trial(lm, setup, mean, strategy="merged")
    ie = fast_trial(lm, setup, mean)
    assert fast.merged_refusal(lm.model) is not None
    assert relative_drift(ie, exact[0]) <= FAST_VS_EXACT_REL_TOL


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-neox", "tiny-gemma-hd"])
def test_in_float64_fast_equals_exact(prepared, antonym, antonym_trials, alias):
    lm, mean, _ = prepared(alias)
    setup = first_setup(lm, antonym, antonym_trials)
    lm.model.double()
    try:
        exact = exact_trial(lm, setup, mean.double())
        by_blocks = fast_trial(lm, setup, mean.double(), strategy="blocks")
        by_model = fast_trial(lm, setup, mean.double(), strategy="model")
    finally:
        lm.model.float()  # float32 -> float64 -> float32 is lossless; the shared model is unchanged
    assert relative_drift(by_blocks, exact) <= FLOAT64_REL_TOL
    assert relative_drift(by_model, exact) <= FLOAT64_REL_TOL


@pytest.mark.parametrize("strategy", ["blocks", "model"])
@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-mistral"])
def test_patching_the_wrong_head_is_caught(prepared, antonym, antonym_trials, monkeypatch, alias, strategy):
    lm, mean, exact = prepared(alias)
    n_heads, head_dim = lm.dims.n_heads, lm.dims.head_dim

    def shifted(mean_acts, layer, slots, n_heads_, head_dim_, heads=None, first_row=0):
        heads = torch.arange(n_heads)
        wrong = (heads + 1) % n_heads  # row h gets head h+1's value, at head h+1

        def fn(x):
            x = x.clone()
            view = x.view(*x.shape[:-1], n_heads, head_dim)
            for slot in slots:
                view[heads + first_row, -1, wrong] = mean_acts[layer, wrong, slot]
            return x
        return fn

    monkeypatch.setattr(fast, "head_patch", shifted)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the broken patch itself must run, not a fallback
        broken = fast_trial(lm, first_setup(lm, antonym, antonym_trials), mean, strategy=strategy)
    assert relative_drift(broken, exact[0]) > 100 * FAST_VS_EXACT_REL_TOL


def test_a_wrong_last_token_is_refused(prepared, antonym, antonym_trials, monkeypatch):
    lm, mean, _ = prepared("tiny-llama")
    setup = first_setup(lm, antonym, antonym_trials)
    right = kv_replay.last_token_inputs

    def second_to_last(inputs, n_rows):  # the cache is right, the recomputed token is not
        shifted = dict(inputs)
        shifted["input_ids"] = torch.roll(inputs["input_ids"], 1, dims=1)
        return right(shifted, n_rows)

    monkeypatch.setattr(kv_replay, "last_token_inputs", second_to_last)
    monkeypatch.setattr(fast, "last_token_inputs", second_to_last)
    monkeypatch.setattr(fast, "_BLOCKS_REFUSED", fast.weakref.WeakKeyDictionary())
    capture_only(monkeypatch, lm)
    with pytest.raises(ReplayUnsupported, match="unpatched row"):
        fast_trial(lm, setup, mean, strategy="blocks")
    with pytest.raises(FvkitError, match="unpatched row.*--ie-mode exact"):
        fast_trial(lm, setup, mean, strategy="model")


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gemma", "tiny-neox"])
def test_the_last_tokens_calls_come_from_the_prompts_pass(prepared, antonym, antonym_trials, monkeypatch, alias):
    """Where every block argument can be cut to the last position, no capture pass runs, and the
    effects are the exact path's."""
    lm, mean, exact = prepared(alias)
    monkeypatch.setattr(fast, "_PROMPT_CALLS_REFUSED", fast.weakref.WeakKeyDictionary())
    monkeypatch.setattr(fast, "capture_last_token", lambda *a, **k: pytest.fail("the capture pass ran"))
    ie = fast_trial(lm, first_setup(lm, antonym, antonym_trials), mean, strategy="blocks")
    drift = relative_drift(ie, exact[0])
    assert drift <= FAST_VS_EXACT_REL_TOL, f"{alias}: {drift:.2e} of the largest |IE|"


def test_a_wrong_position_cut_from_the_prompts_pass_is_refused(prepared, antonym, antonym_trials, monkeypatch):
    lm, mean, _ = prepared("tiny-llama")
    right = kv_replay.last_positions_call

    def second_to_last(args, kwargs, n_tokens, n_rows, width=1):  # the hidden state of the token before the last
        kwargs = dict(kwargs)
        if args:
            args = (args[0].roll(1, dims=1),) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = kwargs["hidden_states"].roll(1, dims=1)
        return right(args, kwargs, n_tokens, n_rows, width)

    monkeypatch.setattr(kv_replay, "last_positions_call", second_to_last)
    monkeypatch.setattr(fast, "_PROMPT_CALLS_REFUSED", fast.weakref.WeakKeyDictionary())
    with pytest.raises(ReplayUnsupported, match="unpatched row"):
        fast_trial(lm, first_setup(lm, antonym, antonym_trials), mean, strategy="blocks")


def test_a_prefix_cut_short_in_the_prompts_pass_falls_back_to_a_capture(prepared, antonym, antonym_trials,
                                                                      monkeypatch):
    lm, mean, exact = prepared("tiny-llama")
    record = kv_replay.BlockCalls._record
    monkeypatch.setattr(kv_replay.BlockCalls, "_record",
                        lambda self, owner, n_new=None: record(self, owner, None if n_new is None else n_new + 1))
    monkeypatch.setattr(fast, "_PROMPT_CALLS_REFUSED", fast.weakref.WeakKeyDictionary())
    ie = fast_trial(lm, first_setup(lm, antonym, antonym_trials), mean, strategy="blocks")
    assert "did not hold the prompt's positions" in fast._PROMPT_CALLS_REFUSED[lm.model]
    assert relative_drift(ie, exact[0]) <= FAST_VS_EXACT_REL_TOL


def count_joins(monkeypatch) -> dict:
    """How many replayed attention calls got the prefix copied per row (and for how many rows each),
    and how many placeholders."""
    counts = {"copies": 0, "placeholders": 0, "copied_rows": set()}
    join = kv_replay.join_prefix

    def counted(keys, values, key_states, value_states, placeholders=False):
        counts["placeholders" if placeholders else "copies"] += 1
        if not placeholders:
            counts["copied_rows"].add(key_states.shape[0])
        return join(keys, values, key_states, value_states, placeholders)

    monkeypatch.setattr(kv_replay, "join_prefix", counted)
    return counts


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gemma", "tiny-neox"])
def test_rows_get_no_prefix_copies_once_every_layer_was_seen_attending(prepared, antonym, antonym_trials,
                                                                      monkeypatch, alias):
    """Before a model's first replay, every block is called once on a few rows with real copies of
    the prefix (and learns that the shared-prefix attention read them); the trial's own rows, and
    every later trial's, get placeholders in one pass, and the effects stay the exact path's."""
    lm, mean, exact = prepared(alias)
    blocks = fast.adapters.resolve_blocks(lm.model, lm.spec)
    monkeypatch.setattr(kv_replay, "_ATTENDING", kv_replay.weakref.WeakKeyDictionary())
    monkeypatch.setattr(kv_replay, "_PROBED", kv_replay.weakref.WeakKeyDictionary())
    counts = count_joins(monkeypatch)
    passes = []
    run_pass = fast._run_pass
    monkeypatch.setattr(fast, "_run_pass", lambda *a: passes.append(a[-2:]) or run_pass(*a))
    setup = first_setup(lm, antonym, antonym_trials)
    first = fast_trial(lm, setup, mean, strategy="blocks")
    assert counts["copies"] == lm.dims.n_layers and counts["copied_rows"] == {fast.CAPTURE_ROWS}, counts
    assert counts["placeholders"] >= lm.dims.n_layers, counts
    assert kv_replay._ATTENDING[blocks] == set(range(lm.dims.n_layers))
    assert passes == [(0, lm.dims.n_layers)], "the first trial's rows did not go in one pass"
    counts.update(copies=0, placeholders=0)
    second = fast_trial(lm, setup, mean, strategy="blocks")
    assert counts["copies"] == 0 and counts["placeholders"] >= lm.dims.n_layers, counts
    for ie in (first, second):
        drift = relative_drift(ie, exact[0])
        assert drift <= FAST_VS_EXACT_REL_TOL, f"{alias}: {drift:.2e} of the largest |IE|"


def test_placeholders_an_attention_does_not_read_through_the_shared_prefix_are_refused(
        prepared, antonym, antonym_trials, monkeypatch):
    """A layer once seen attending through the shared prefix whose attention later bypasses it
    would compute on the placeholders' zeros: the block call is refused instead."""
    lm, mean, _ = prepared("tiny-llama")
    blocks = fast.adapters.resolve_blocks(lm.model, lm.spec)
    monkeypatch.setattr(kv_replay, "_ATTENDING",
                        kv_replay.weakref.WeakKeyDictionary({blocks: set(range(lm.dims.n_layers))}))
    # The model's own eager attention stays in place, as under another attention implementation.
    monkeypatch.setattr(kv_replay.SharedPrefixAttention, "__enter__", lambda self: self)
    with pytest.raises(ReplayUnsupported, match="were placeholders"):
        fast_trial(lm, first_setup(lm, antonym, antonym_trials), mean, strategy="blocks")


def test_without_prefix_copies_a_pass_carries_more_layers():
    class Dims:
        n_layers, n_heads, head_dim = 30, 9, 64

    class LM:
        dims = Dims
        model = torch.nn.Linear(1000, 1000)  # 4 MB of weights: the floor budget applies

    copies = fast.layers_per_pass(LM, n_tokens=99, rows=10)
    shared = fast.layers_per_pass(LM, n_tokens=99, rows=10, prefix_copies=False)
    assert copies == fast.PASS_MEMORY_FLOOR_BYTES // (4 * 99 * 9 * 64 * 4 * 10)
    assert shared == min(Dims.n_layers, fast.PASS_MAX_ROWS // 10) > copies


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"], ids=["legacy-tuple-cache", "cache-object"])
def test_a_cache_of_the_wrong_length_is_refused(prepared, antonym, antonym_trials, monkeypatch, alias):
    lm, mean, _ = prepared(alias)
    capture_only(monkeypatch, lm)

    drop_last = kv_cache.drop_last
    monkeypatch.setattr(kv_cache, "drop_last", lambda cache, n: drop_last(cache, n + 1))
    with pytest.raises(FvkitError, match="positions after dropping the last"):
        fast_trial(lm, first_setup(lm, antonym, antonym_trials), mean, strategy="blocks")


def test_auto_falls_back_when_the_forward_does_more_than_its_blocks(prepared, antonym, antonym_trials, monkeypatch):
    lm, mean, _ = prepared("tiny-olmo")
    setup = first_setup(lm, antonym, antonym_trials)
    monkeypatch.setattr(fast, "_BLOCKS_REFUSED", fast.weakref.WeakKeyDictionary())
    monkeypatch.setattr(fast, "_MERGED_REFUSED", fast.weakref.WeakKeyDictionary())

    def soft_cap(module, args, output):  # logit soft-capping after the output head, as Gemma 2 does
        output.logits = 5.0 * torch.tanh(output.logits / 5.0)
        return output

    handle = lm.model.register_forward_hook(soft_cap)
    try:
        exact = exact_trial(lm, setup, mean)
        with pytest.raises(ReplayUnsupported):
            fast_trial(lm, setup, mean, strategy="blocks")
        with pytest.warns(UserWarning, match="whole model"):
            first = fast_trial(lm, setup, mean)
        assert lm.model in fast._BLOCKS_REFUSED and "unpatched row" in fast.merged_refusal(lm.model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # decided once per model
            again = fast_trial(lm, setup, mean)
    finally:
        handle.remove()
    assert torch.equal(first, again)
    assert relative_drift(first, exact) <= FAST_VS_EXACT_REL_TOL


def test_no_last_token_slot_means_no_effect(prepared, antonym, antonym_trials):
    lm, mean, _ = prepared("tiny-gpt2")
    setup = first_setup(lm, antonym, antonym_trials)
    setup.last_slots = []
    assert torch.equal(fast_trial(lm, setup, mean), torch.zeros(lm.dims.n_layers, lm.dims.n_heads))
    assert torch.equal(exact_trial(lm, setup, mean), torch.zeros(lm.dims.n_layers, lm.dims.n_heads))


def test_unknown_strategy(prepared, antonym, antonym_trials):
    lm, mean, _ = prepared("tiny-gpt2")
    with pytest.raises(FvkitError, match="unknown fast indirect-effect strategy 'quick'"):
        fast_trial(lm, first_setup(lm, antonym, antonym_trials), mean, strategy="quick")


def test_batch_rows_are_padded_to_whole_blocks():
    assert [batch_rows(h) for h in (1, 3, 4, 9, 12, 16)] == [4, 4, 8, 12, 16, 20]


def test_relative_drift():
    ref = torch.tensor([1e-6, -4e-6, 0.0])
    assert relative_drift(ref.clone(), ref) == 0.0
    assert relative_drift(ref + torch.tensor([0.0, 0.0, 2e-6]), ref) == pytest.approx(0.5)
    assert relative_drift(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_drift(torch.ones(3), torch.zeros(3)) == float("inf")
