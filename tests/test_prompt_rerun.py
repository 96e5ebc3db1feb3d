"""Near ties re-run from the edited block on: the whole-prompt pass's logits, bit for bit.

The cached evaluation re-runs a near tie from the clean pass's record (blocks
``L+1..`` only) instead of a whole forward pass with the vector. Its ranks are
only exact if those logits equal :func:`fvkit.method.intervene.edited_logits`'s
exactly, on every architecture; the same record gives the residual-stream norms
the vector-scale check needs, so those must equal a separate clean pass's too.
"""

import pytest
import torch

from fvkit.fast import prompt_rerun
from fvkit.fast.evaluation import cached_stage, clean_pass
from fvkit.fast.run_evaluations import run_evaluations
from fvkit.method.intervene import edited_logits, token_rank
from fvkit.method.prompts import DEFAULT_TEMPLATE
from fvkit.method.vector_scale import residual_norms
from fvkit.models.zoo import TINY_PARITY_MODELS

PROMPT = "Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:"
#: Longer than prompt_rerun.HEAD_POSITIONS tokens: the output head then reads only the last
#: positions, which must round as the whole prompt's head does.
#: Shorter than prompt_rerun.HEAD_POSITIONS tokens on every tokenizer (a zero-shot prompt):
#: the head reads SHORT_HEAD_POSITIONS of them once that was checked for the model.
SHORT_PROMPT = "Q: big\nA:"
LONG_PROMPT = "".join(f"Q: {a}\nA: {b}\n\n" for a, b in
                      [("hot", "cold"), ("up", "down"), ("wet", "dry"), ("early", "late"), ("open", "shut")]) + "Q: big\nA:"


def vector(lm, scale=5.0):
    return torch.randn(lm.dims.hidden_size, generator=torch.Generator().manual_seed(1)) * scale


@pytest.mark.parametrize("prompt", [SHORT_PROMPT, PROMPT, LONG_PROMPT], ids=["zero-shot", "short", "long"])
@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_rerun_from_the_record_equals_the_whole_prompt_pass(alias, prompt, zoo_model):
    lm = zoo_model(alias)
    fv = vector(lm)
    inputs = lm.tokenizer([prompt], return_tensors="pt")
    if prompt is LONG_PROMPT:
        assert inputs["input_ids"].shape[1] > prompt_rerun.HEAD_POSITIONS
    with torch.no_grad():
        clean, _, record = clean_pass(lm, inputs)
        whole_clean = lm.model(**inputs).logits[0, -1]
        assert torch.equal(clean.reshape(-1), whole_clean), (
            f"{alias}: the clean pass's logits differ from the whole prompt's by "
            f"{(clean.reshape(-1) - whole_clean).abs().max().item():.3g}, expected none")
        for layer in range(lm.dims.n_layers):
            fast = record.edited_logits(layer, fv)
            whole = edited_logits(lm, inputs, layer, fv)
            assert torch.equal(fast, whole), (f"{alias} layer {layer}: largest difference "
                                              f"{(fast - whole).abs().max().item():.3g}, expected none")


def test_a_rerun_that_differs_is_refused_and_the_whole_model_used(zoo_model, monkeypatch):
    lm = zoo_model("tiny-llama")
    fv = vector(lm)
    inputs = lm.tokenizer([PROMPT], return_tensors="pt")
    monkeypatch.setattr(prompt_rerun, "_REFUSED", type(prompt_rerun._REFUSED)())
    monkeypatch.setattr(prompt_rerun, "_CHECKED", type(prompt_rerun._CHECKED)())
    original = prompt_rerun.PromptRecord.edited_logits
    # A record that starts one block late (the edit lost on the way): its logits differ.
    monkeypatch.setattr(prompt_rerun.PromptRecord, "edited_logits",
                        lambda self, layer, vec: original(self, min(layer + 1, lm.dims.n_layers - 1), vec))
    with torch.no_grad():
        _, _, record = clean_pass(lm, inputs)
        got = prompt_rerun.exact_rerun(lm, record, inputs, 0, fv)
        assert torch.equal(got, edited_logits(lm, inputs, 0, fv))
    assert "moved the logits" in prompt_rerun.rerun_refusal(lm.model)


def head_rows(monkeypatch, lm) -> list:
    """The number of positions the output head reads, call by call."""
    seen = []
    head = prompt_rerun.adapters.resolve_lm_head(lm.model, lm.spec)
    forward = head.forward
    monkeypatch.setattr(head, "forward", lambda x: seen.append(x.shape[-2]) or forward(x))
    return seen


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_a_short_prompts_head_reads_few_positions_only_once_checked(alias, zoo_model, monkeypatch):
    """The first short prompt's clean pass reads all positions and checks the head on the last
    SHORT_HEAD_POSITIONS against them; later ones read those few only where the check passed.
    Either way the logits are the whole prompt's, bit for bit."""
    lm = zoo_model(alias)
    monkeypatch.setattr(prompt_rerun, "_SHORT_HEAD", type(prompt_rerun._SHORT_HEAD)())
    inputs = lm.tokenizer([SHORT_PROMPT], return_tensors="pt")
    n_tokens = inputs["input_ids"].shape[1]
    assert prompt_rerun.SHORT_HEAD_POSITIONS < n_tokens < prompt_rerun.HEAD_POSITIONS
    seen = head_rows(monkeypatch, lm)
    with torch.no_grad():
        whole = lm.model(**inputs).logits[0, -1]
        seen.clear()
        first, _, _ = clean_pass(lm, inputs)
        assert seen[0] == n_tokens and n_tokens in prompt_rerun._SHORT_HEAD[lm.model]
        seen.clear()
        second, _, _ = clean_pass(lm, inputs)
    checked = prompt_rerun.short_head_refusal(lm.model) is None
    assert seen == [prompt_rerun.SHORT_HEAD_POSITIONS if checked else n_tokens]
    for logits in (first, second):
        assert torch.equal(logits.reshape(-1), whole)


def test_a_head_that_rounds_otherwise_on_few_positions_keeps_reading_all(zoo_model, monkeypatch):
    lm = zoo_model("tiny-llama")
    monkeypatch.setattr(prompt_rerun, "_SHORT_HEAD", type(prompt_rerun._SHORT_HEAD)())
    inputs = lm.tokenizer([SHORT_PROMPT], return_tensors="pt")
    n_tokens = inputs["input_ids"].shape[1]
    head = prompt_rerun.adapters.resolve_lm_head(lm.model, lm.spec)
    forward = head.forward
    # Logits one ulp-scale step off whenever fewer than all positions are read.
    monkeypatch.setattr(head, "forward", lambda x: forward(x) * (1 if x.shape[-2] == n_tokens else 1 + 1e-6))
    with torch.no_grad():
        clean_pass(lm, inputs)
        assert "moved the last logits" in prompt_rerun.short_head_refusal(lm.model)
        assert prompt_rerun.head_positions(lm.model, n_tokens) == n_tokens
        again, _, _ = clean_pass(lm, inputs)
        assert torch.equal(again.reshape(-1), lm.model(**inputs).logits[0, -1])


def test_a_record_is_freed_as_soon_as_it_is_dropped(zoo_model):
    """A record holds a prompt's block outputs, inputs and keys; a reference cycle through it would
    keep them until Python's cyclic collector happens to run (which counts objects, not bytes): over
    a layer sweep's prompts that measured hundreds of MB on SmolLM2-135M."""
    import gc
    import weakref

    lm = zoo_model("tiny-llama")
    inputs = lm.tokenizer([LONG_PROMPT], return_tensors="pt")
    gc.disable()
    try:
        with torch.no_grad():
            _, _, record = clean_pass(lm, inputs)
            record.edited_logits(0, vector(lm), width=prompt_rerun.rerun_width(inputs["input_ids"].shape[1]))
        alive = weakref.ref(record)
        del record
        assert alive() is None, "the record outlived its last reference (a reference cycle)"
    finally:
        gc.enable()


@pytest.fixture
def fresh_window_checks(monkeypatch):
    """No model's last-positions re-run checked or refused yet, on one thread (as in the suite's
    parity runs: which products round alike depends on how the rows are split between threads)."""
    for name in ("_WINDOW_CHECKED", "_WINDOW_REFUSED", "_REFUSED", "_CHECKED"):
        monkeypatch.setattr(prompt_rerun, name, type(getattr(prompt_rerun, name))())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def block_widths(monkeypatch, lm) -> list:
    """The number of positions each decoder block call runs on."""
    seen = []
    for block in prompt_rerun.adapters.resolve_blocks(lm.model, lm.spec):
        forward = block.forward
        monkeypatch.setattr(block, "forward", lambda *a, forward=forward, **k:
                            seen.append(first_hidden(a, k).shape[-2]) or forward(*a, **k))
    return seen


def first_hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_a_long_prompts_rerun_on_its_last_positions_is_checked_once(alias, zoo_model, fresh_window_checks,
                                                                     monkeypatch):
    """A long prompt's near tie is re-run on its last positions (rerun_width) where the model's
    first such re-run equalled the whole-prompt pass bit for bit; elsewhere it is refused with the
    reason and all positions are re-run. Either way every answer is the whole-prompt pass's."""
    lm = zoo_model(alias)
    fv = vector(lm)
    inputs = lm.tokenizer([LONG_PROMPT * 2], return_tensors="pt")
    width = prompt_rerun.rerun_width(inputs["input_ids"].shape[1], prompt_rerun.adapters.resolve_blocks(lm.model, lm.spec))
    assert width is not None
    with torch.no_grad():
        _, _, record = clean_pass(lm, inputs)
        first = prompt_rerun.exact_rerun(lm, record, inputs, 0, fv)
        refusal = prompt_rerun.window_refusal(lm.model)
        widths = block_widths(monkeypatch, lm)
        later = [prompt_rerun.exact_rerun(lm, record, inputs, layer, fv) for layer in range(lm.dims.n_layers)]
        widths = list(widths)   # the re-runs' own calls, before the whole-prompt passes below
        for layer, got in enumerate([first] + later):
            assert torch.equal(got, edited_logits(lm, inputs, max(layer - 1, 0), fv)), f"{alias} layer {layer}"
    if refusal is None:
        assert prompt_rerun._WINDOW_CHECKED[lm.model] is True
        assert set(widths) == {width}
    else:
        assert "positions from layer 1" in refusal
        assert width not in widths


def test_last_positions_rerun_is_used_on_some_tiny_models_and_refused_on_others(zoo_model, fresh_window_checks):
    """Both branches of the check are exercised by the tiny models: a block taking the mask
    positionally (tiny-gpt2, under either transformers line) cannot be cut to the last positions;
    tiny-llama's blocks run on them as on the whole prompt."""
    outcome = {}
    for alias in ("tiny-gpt2", "tiny-llama"):
        lm = zoo_model(alias)
        inputs = lm.tokenizer([LONG_PROMPT], return_tensors="pt")
        with torch.no_grad():
            _, _, record = clean_pass(lm, inputs)
            prompt_rerun.exact_rerun(lm, record, inputs, 0, vector(lm))
        outcome[alias] = prompt_rerun.window_refusal(lm.model)
    assert "failed (ReplayUnsupported" in outcome["tiny-gpt2"] and outcome["tiny-llama"] is None, outcome


def test_a_window_that_meets_the_elementwise_loops_otherwise_is_caught(zoo_model, fresh_window_checks,
                                                                      monkeypatch):
    """Why the window is aligned: on tiny-llama (53 MLP features) the last 16 of 52 positions give
    the last row's SiLU other bits than the whole prompt's pass (the rows before it alike, so the
    per-block comparison cannot see it); exact_rerun's first check against the whole-prompt pass
    does, refuses the window and answers with the whole-prompt pass."""
    lm = zoo_model("tiny-llama")
    fv = vector(lm)
    inputs = lm.tokenizer([LONG_PROMPT], return_tensors="pt")
    n_tokens = inputs["input_ids"].shape[1]
    assert (n_tokens - 16) % prompt_rerun.RERUN_ALIGN and prompt_rerun.rerun_width(n_tokens) != 16
    with torch.no_grad():
        _, _, record = clean_pass(lm, inputs)
        unaligned = record.edited_logits(1, fv, width=16)
        aligned = record.edited_logits(1, fv, width=prompt_rerun.rerun_width(n_tokens))
        whole = edited_logits(lm, inputs, 1, fv)
    assert torch.equal(aligned, whole)
    assert not torch.equal(unaligned, whole)
    monkeypatch.setattr(prompt_rerun, "rerun_width", lambda n, blocks=None: 16)
    with torch.no_grad():
        assert torch.equal(prompt_rerun.exact_rerun(lm, record, inputs, 1, fv), whole)
    assert "re-running the last 16 positions from layer 2 moved the logits" in prompt_rerun.window_refusal(lm.model)


def test_a_last_positions_rerun_on_the_wrong_keys_is_refused(zoo_model, fresh_window_checks, monkeypatch):
    """A window update that hands the blocks the keys and values shifted by one position (the kind
    of off-by-one that the window's cut invites) is refused on the first re-run: the window's rows
    before the last no longer come out of block 1 as in the recorded pass. That re-run's answer is
    the whole-prompt pass's, and the window is not used after."""
    lm = zoo_model("tiny-neox")
    fv = vector(lm)
    inputs = lm.tokenizer([LONG_PROMPT], return_tensors="pt")
    def shifted_update(self, before):
        def update(key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = self._keys[layer_idx]
            return (torch.cat([keys[..., 1:before + 1, :], key_states], dim=-2),
                    torch.cat([values[..., 1:before + 1, :], value_states], dim=-2))
        return update

    monkeypatch.setattr(prompt_rerun.PromptRecord, "_window_update", shifted_update)
    with torch.no_grad():
        _, _, record = clean_pass(lm, inputs)
        got = prompt_rerun.exact_rerun(lm, record, inputs, 0, fv)
        assert torch.equal(got, edited_logits(lm, inputs, 0, fv))
        assert "block 1 on the last" in prompt_rerun.window_refusal(lm.model)
        assert torch.equal(prompt_rerun.exact_rerun(lm, record, inputs, 1, fv), edited_logits(lm, inputs, 1, fv))


@pytest.mark.parametrize("alias", ("tiny-gpt2", "tiny-llama"))
def test_residual_norms_from_the_evaluation_equal_a_separate_clean_pass(alias, zoo_model, antonym, antonym_trials):
    lm = zoo_model(alias)
    fv = vector(lm)
    evals = run_evaluations(lm, antonym, antonym_trials, fv, 1, show_progress=False)
    assert evals.residual_norms == residual_norms(lm, antonym, antonym_trials, 1)
    sweep = run_evaluations(lm, antonym, antonym_trials, fv, 1, sweep=True, show_progress=False)
    assert sweep.residual_norms == evals.residual_norms
    assert all("residual_norms" not in s for s in sweep.sweep["stages"].values())


def test_cached_stage_measures_norms_only_when_asked(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-llama")
    raw = cached_stage(lm, antonym, antonym_trials, "zero_shot", vector(lm), [1], DEFAULT_TEMPLATE, 2,
                       show_progress=False)
    assert "residual_norms" not in raw


@pytest.mark.parametrize("values,target,rank", [
    ([0.5, 2.0, 1.0, -1.0], 0, 2),   # distinct logits: counted
    ([0.5, 2.0, 1.0, -1.0], 1, 0),
    ([1.0, 1.0, 3.0, 1.0], 3, None),  # the target shares its logit: the argsort decides
])
def test_token_rank_counts_where_no_other_token_shares_the_logit(values, target, rank):
    logits = torch.tensor([values])
    by_sort = torch.where(torch.argsort(logits.squeeze(), descending=True) == target)[0].item()
    assert token_rank(logits, target) == (by_sort if rank is None else rank) == by_sort


@pytest.mark.smollm2
def test_on_smollm2_a_long_prompts_clean_logits_and_rerun_equal_the_whole_prompt_pass():
    """The tiny models' products round alike for any row count; SmolLM2-135M's do not on every
    CPU (on an AVX-512 machine its output head on the last 4 of 99 positions rounded otherwise
    than on all 99), so HEAD_POSITIONS is checked where the row count shows."""
    from fvkit.errors import FvkitError
    from fvkit.models.loader import load_model
    from fvkit.models.zoo import gguf_dir

    try:
        gguf_dir("smollm2-135m")
    except FvkitError as err:
        pytest.skip(str(err))
    lm = load_model("smollm2-135m")
    inputs = lm.tokenizer([LONG_PROMPT * 3], return_tensors="pt")
    assert inputs["input_ids"].shape[1] > 4 * prompt_rerun.HEAD_POSITIONS
    fv = vector(lm)
    # One thread, as the suite's parity runs: the near-tie window is used only then.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            clean, _, record = clean_pass(lm, inputs)
            assert torch.equal(clean.reshape(-1), lm.model(**inputs).logits[0, -1])
            assert torch.equal(record.edited_logits(20, fv), edited_logits(lm, inputs, 20, fv))
            # Its features are multiples of RERUN_ALIGN: near ties re-run on the last 16
            # positions, the same bits at every layer checked here.
            width = prompt_rerun.rerun_width(inputs["input_ids"].shape[1], record.blocks)
            assert width == prompt_rerun.RERUN_POSITIONS
            for layer in (0, 9, 20, 28):
                assert torch.equal(record.edited_logits(layer, fv, width=width), edited_logits(lm, inputs, layer, fv))
    finally:
        torch.set_num_threads(threads)
