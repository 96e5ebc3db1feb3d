"""The reference runner (the parity_tests/reference/ package) on tiny zoo models.

Needs a function_vectors checkout and baukit: $FVKIT_REFERENCE_SRC / $FVKIT_BAUKIT,
else /tmp/ref/function_vectors and /tmp/ref/baukit (or an installed baukit).
Without them the tests that run the reference are skipped, saying why.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # parity_tests/ is a folder of the repository, not of the package
    sys.path.insert(0, str(REPO))

from fvkit.method.data import load_task_dataset  # noqa: E402
from fvkit.errors import FvkitError  # noqa: E402
from fvkit.method.fixed_trials import FixedTrials  # noqa: E402
from parity_tests import reference as rr  # noqa: E402

REFERENCE_SRC = os.environ.get("FVKIT_REFERENCE_SRC", "/tmp/ref/function_vectors")
BAUKIT = os.environ.get("FVKIT_BAUKIT") or ("/tmp/ref/baukit" if Path("/tmp/ref/baukit").is_dir() else None)
#: transformers releases from which decoder blocks return a plain tensor, so the
#: reference's add_function_vector stops editing them.
PLAIN_BLOCK_OUTPUT_FROM = {"tiny-gpt2": Version("5.3"), "tiny-llama": Version("4.54")}
#: Rows of the repository's antonym dataset used here: enough for a 3-shot prompt and a
#: non-empty test split (8 items), few enough that every evaluation stays fast.
N_ROWS = 40
N_TRIALS, N_SHOTS, MAX_TRIALS, N_TOP_HEADS, EDIT_LAYER = 3, 3, 2, 3, 1


def _reference_or_skip():
    try:
        return rr.load_reference(REFERENCE_SRC, BAUKIT)
    except FvkitError as err:
        pytest.skip(f"no usable reference checkout ({err})")


@pytest.fixture(scope="module")
def refs():
    return _reference_or_skip()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    rows = load_task_dataset("antonym").rows[:N_ROWS]
    path = tmp_path_factory.mktemp("data") / "antonym_small.json"
    path.write_text(json.dumps(rows, indent=0))
    return load_task_dataset(str(path))


@pytest.fixture(scope="module")
def small_trials(small_dataset):
    return FixedTrials.make(small_dataset, n_trials=N_TRIALS, n_shots=N_SHOTS, seed=0)


@pytest.fixture(scope="module")
def reference_results(refs, zoo_model, small_dataset, small_trials):
    """One reference run per model, shared by the tests below."""
    out = {}
    for alias in ("tiny-gpt2", "tiny-llama"):
        np_state, grad = np.random.get_state()[1].copy(), torch.is_grad_enabled()
        result = rr.run_reference(zoo_model(alias), small_dataset.path, small_trials, reference_src=REFERENCE_SRC,
                                  baukit=BAUKIT, n_top_heads=N_TOP_HEADS, edit_layer=EDIT_LAYER,
                                  max_trials=MAX_TRIALS)
        assert np.array_equal(np.random.get_state()[1], np_state), "the run left numpy's global RNG reseeded"
        assert torch.is_grad_enabled() == grad, "the run left autograd switched"
        out[alias] = result
    return out


def prompt_follows_trial(prompt: str, demos: list, query: tuple) -> bool:
    """Whether a prompt holds the trial's demonstrations in order and ends with its query."""
    pos = 0
    for inp, out in demos:
        piece = f"Q: {inp}\nA: {out}\n\n"
        found = prompt.find(piece, pos)
        if found < 0:
            return False
        pos = found + len(piece)
    return prompt.endswith(f"Q: {query[0]}\nA:")


# --- layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_result_has_every_key_with_the_right_shape(reference_results, zoo_model, small_trials, alias):
    r = reference_results[alias]
    dims = zoo_model(alias).dims
    assert set(r) == {"meta", "m1", *rr.RESULT_STAGES}
    assert r["meta"]["unsupported"] == {}
    n_slots = len(r["m1"]["dummy_labels"])
    assert np.array(r["mean_activations"]).shape == (dims.n_layers, dims.n_heads, n_slots, dims.head_dim)
    assert np.array(r["indirect_effect"]).shape == (MAX_TRIALS, dims.n_layers, dims.n_heads)
    assert np.array(r["function_vector"]).shape == (1, dims.hidden_size)
    assert len(r["top_heads"]) == N_TOP_HEADS
    assert all(isinstance(layer, int) and isinstance(head, int) and isinstance(score, float)
               for layer, head, score in r["top_heads"])
    n_test = len(small_trials.split["test"])
    for stage in ("zero_shot", "shuffled"):
        assert len(r[stage]["clean_rank_list"]) == len(r[stage]["intervention_rank_list"]) == n_test
        assert [k for k, _ in r[stage]["clean_topk"]] == [1, 2, 3]
    assert len(r["baseline"]["clean_rank_list"]) == n_test
    counts = {stage: len(p) for stage, p in r["m1"]["prompts"].items()}
    assert counts == {"mean_activations": MAX_TRIALS, "indirect_effect": MAX_TRIALS,
                      "zero_shot": n_test, "shuffled": n_test, "baseline": n_test}
    m1 = r["m1"]
    assert len(m1["token_labels"]) == len(m1["token_ids"]) > n_slots - 1
    assert sorted(m1["idx_map"].values()) == list(range(n_slots))
    json.dumps(r)  # plain Python values only


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_reference_split_and_prompts_are_the_fixed_trials(reference_results, small_dataset, small_trials, alias):
    r = reference_results[alias]
    assert r["m1"]["split"] == small_trials.split
    for stage, prompts in r["m1"]["prompts"].items():
        for i, prompt in enumerate(prompts):
            demos, query = small_trials.pairs(stage, i, small_dataset)
            assert prompt_follows_trial(prompt, demos, query), (stage, i, prompt)


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_recorded_draws_are_the_references_own_and_equal_the_fixed_trials(reference_results, small_dataset,
                                                                          small_trials, alias):
    draws = reference_results[alias]["m1"]["draws"]
    assert {stage: len(d) for stage, d in draws.items()} == {
        stage: len(p) for stage, p in reference_results[alias]["m1"]["prompts"].items()}
    # Shuffled stages record the labels as the prompt shows them, not the clean pairs.
    assert draws == small_trials.draws(small_dataset, MAX_TRIALS)
    other = FixedTrials.make(small_dataset, n_trials=N_TRIALS, n_shots=N_SHOTS, seed=1)
    assert draws != other.draws(small_dataset, MAX_TRIALS)


def test_prompt_check_fails_on_other_draws(reference_results, small_dataset):
    other = FixedTrials.make(small_dataset, n_trials=N_TRIALS, n_shots=N_SHOTS, seed=1)
    prompts = reference_results["tiny-gpt2"]["m1"]["prompts"]["mean_activations"]
    assert not all(prompt_follows_trial(p, *other.pairs("mean_activations", i, small_dataset))
                   for i, p in enumerate(prompts))


def test_token_meta_data_describe_the_first_prompt(reference_results, zoo_model):
    r = reference_results["tiny-llama"]
    lm = zoo_model("tiny-llama")
    first = r["m1"]["prompts"]["mean_activations"][0]
    assert r["m1"]["token_ids"] == lm.tokenizer(first).input_ids
    assert r["m1"]["token_labels"][-1][2] == "query_predictive_token"
    assert r["m1"]["dummy_labels"][0] == [0, "bos_token"]


# --- meta -----------------------------------------------------------------------------

@pytest.mark.parametrize("alias, branch", [("tiny-gpt2", "gpt2-xl"), ("tiny-llama", "llama")])
def test_normalizations_are_recorded(reference_results, alias, branch):
    meta = reference_results[alias]["meta"]
    notes = "\n".join(meta["normalizations"])
    assert meta["model_config"]["name_or_path"] == branch == meta["reference_branch"]
    assert f"name_or_path='{branch}'" in notes
    assert "attn_hook_names" in notes and "MODEL_CONFIG built from ModelSpec" in notes
    assert "symlinked as <tmp>/abstractive/antonym_small.json" in notes
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes is not importable" in notes
    assert meta["reference_commit"] == "unknown" or len(meta["reference_commit"]) == 40
    assert meta["transformers"] == transformers.__version__
    assert meta["settings"]["trials_used"] == MAX_TRIALS and meta["settings"]["edit_layer"] == EDIT_LAYER


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_injection_is_flagged_exactly_when_blocks_return_a_tensor(reference_results, alias):
    meta = reference_results[alias]["meta"]
    plain = Version(transformers.__version__) >= PLAIN_BLOCK_OUTPUT_FROM[alias]
    probe = meta["injection_probe"]
    if plain:
        assert meta["invalid"]["m4"] and "plain Tensor" in meta["invalid"]["m4"]
        assert probe["block_output_type"] == "Tensor" and probe["max_abs_logit_change"] == 0.0
    else:
        assert meta["invalid"]["m4"] is None
        assert probe["block_output_type"] == "tuple" and probe["max_abs_logit_change"] > 0.0


def test_loads_in_a_process_that_has_not_imported_transformers(refs):
    """The command line loads the reference before any model; transformers' first import
    must not meet the bitsandbytes stand-in (under 4.49 its find_spec probe raised)."""
    code = ("import sys; from parity_tests.reference import load_reference; "
            f"load_reference({REFERENCE_SRC!r}, {BAUKIT!r}); "
            "import transformers.utils.import_utils as iu; "
            "print('bitsandbytes' in sys.modules, iu.is_bitsandbytes_available())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    stub_left, available = proc.stdout.split()
    assert stub_left == "False" and available == str(importlib.util.find_spec("bitsandbytes") is not None)


# --- refusals and unsupported models -----------------------------------------------------

def test_wrong_reference_path_names_the_path_and_what_was_expected(zoo_model, small_dataset, small_trials, tmp_path):
    with pytest.raises(FvkitError) as err:
        rr.run_reference(zoo_model("tiny-gpt2"), small_dataset.path, small_trials, reference_src=tmp_path,
                         baukit=BAUKIT, n_top_heads=1, edit_layer=0)
    assert str(tmp_path) in str(err.value) and "src/utils/extract_utils.py" in str(err.value)


def test_missing_baukit_says_how_to_get_it(tmp_path):
    with pytest.raises(FvkitError) as err:
        rr.baukit_package_dir(tmp_path)
    assert str(tmp_path) in str(err.value) and "--baukit" in str(err.value) and "pip install" in str(err.value)


def test_bad_settings_are_refused_before_running(zoo_model, small_dataset, small_trials):
    lm = zoo_model("tiny-gpt2")
    kwargs = dict(reference_src=REFERENCE_SRC, baukit=BAUKIT)
    with pytest.raises(FvkitError, match="edit_layer 9 is out of range"):
        rr.run_reference(lm, small_dataset.path, small_trials, n_top_heads=1, edit_layer=9, **kwargs)
    with pytest.raises(FvkitError, match="max_trials"):
        rr.run_reference(lm, small_dataset.path, small_trials, n_top_heads=1, edit_layer=0, max_trials=99, **kwargs)
    with pytest.raises(FvkitError, match="sha256"):
        rr.run_reference(lm, load_task_dataset("antonym").path, small_trials, n_top_heads=1, edit_layer=0, **kwargs)


def _with_spec(lm, **changes):
    return types.SimpleNamespace(model=lm.model, tokenizer=lm.tokenizer, dims=lm.dims, name=lm.name,
                                 spec=dataclasses.replace(lm.spec, **changes))


def test_foreign_bos_text_makes_every_stage_unsupported(refs, zoo_model, small_dataset, small_trials):
    lm = _with_spec(zoo_model("tiny-gpt2"), bos_text="<s>")
    r = rr.run_reference(lm, small_dataset.path, small_trials, reference_src=REFERENCE_SRC, baukit=BAUKIT,
                         n_top_heads=1, edit_layer=0)
    assert set(r["meta"]["unsupported"]) == {"m1", *rr.RESULT_STAGES}
    assert "'<s>'" in r["meta"]["unsupported"]["mean_activations"]
    assert all(r[key] is None for key in rr.RESULT_STAGES)


def test_head_split_mismatch_splits_heads_at_their_width_and_cannot_build_the_vector(zoo_model):
    """tiny-gemma-hd: 3 heads x 16 = 48 against hidden 40. The head split gets 48, the
    evaluations 40; only compute_function_vector's vector is out of reach, and the
    evaluations wait for a supplied vector."""
    cfg = rr.reference_model_config(zoo_model("tiny-gemma-hd"))
    assert set(cfg.unsupported) == {"function_vector", "zero_shot", "shuffled"}
    assert cfg.unsupported["function_vector"].startswith("reference cannot compute: compute_function_vector")
    assert "needs function_vector" in cfg.unsupported["zero_shot"]
    assert (cfg.model_config["resid_dim"], cfg.eval_config["resid_dim"]) == (48, 40)
    notes = "\n".join(cfg.normalizations)
    assert "resid_dim = n_heads*head_dim = 3*16 = 48" in notes and "resid_dim = hidden_size = 40" in notes
    supplied = rr.reference_model_config(zoo_model("tiny-gemma-hd"), supplied=("function_vector",))
    assert set(supplied.unsupported) == {"function_vector"}
    # Where the widths agree nothing changes: one config serves every stage.
    same = rr.reference_model_config(zoo_model("tiny-gemma"))
    assert same.eval_config is same.model_config and same.model_config["resid_dim"] == 48


@pytest.fixture(scope="module")
def head_split_run(refs, zoo_model, small_dataset, small_trials):
    """The reference on tiny-gemma-hd with fvkit's vector injected, and fvkit's own result."""
    from fvkit.pipeline import run_pipeline

    lm = zoo_model("tiny-gemma-hd")
    ours = run_pipeline(lm, small_dataset, small_trials, n_top_heads=N_TOP_HEADS, edit_layer=EDIT_LAYER,
                        max_trials=MAX_TRIALS, ie_mode="exact", show_progress=False)
    calls = []
    result = rr.run_reference(lm, small_dataset.path, small_trials, reference_src=REFERENCE_SRC, baukit=BAUKIT,
                              n_top_heads=N_TOP_HEADS, edit_layer=EDIT_LAYER, max_trials=MAX_TRIALS,
                              injected_vector=lambda: calls.append(1) or ours.function_vector)
    comparable = ours.comparable()
    comparable["m1"]["split"] = {k: list(v) for k, v in small_trials.split.items()}   # as the parity session adds it
    comparable["m1"]["draws"] = small_trials.draws(small_dataset, MAX_TRIALS)               # likewise
    return result, comparable, ours.function_vector, calls


def test_reference_runs_every_stage_it_can_on_a_head_split_mismatch(head_split_run):
    from fvkit.parity.compare import compare_gate

    r, ours, _, _ = head_split_run
    assert r["function_vector"] is None
    assert set(r["meta"]["unsupported"]) == {"function_vector"}
    for gate in ("M1", "M2", "M3"):
        check = compare_gate(gate, ours, r, "live reference")
        assert check.ok, (gate, check.failures())
    assert np.array(r["mean_activations"]).shape[-1] == 16
    # The reference's own ranking, read from its compute_function_vector call.
    assert r["top_heads"] == ours["top_heads"]
    assert any("read from the failed call's frame" in n for n in r["meta"]["normalizations"])
    # Where the release's blocks return a plain tensor the reference's injection does nothing
    # (meta["invalid"]), so only the clean parts can equal fvkit's there.
    void = r["meta"]["invalid"]["m4"]
    for stage in ("zero_shot", "shuffled", "baseline"):
        keys = [k for k in r[stage] if not (void and k.startswith("intervention"))]
        assert {k: r[stage][k] for k in keys} == {k: ours[stage][k] for k in keys}, stage


def test_injected_vector_is_recorded_as_fvkits(head_split_run):
    from fvkit.parity.injected_vector import vector_change, vector_sha256

    r, _, fv, calls = head_split_run
    record = r["meta"]["injected_vector"]
    assert calls == [1]
    assert record["source"] == "fvkit" and record["stages"] == ["zero_shot", "shuffled"]
    assert record["sha256"] == vector_sha256(fv) and record["norm"] == pytest.approx(float(fv.norm()), rel=1e-6)
    assert any("the injected function vector is fvkit's" in n for n in r["meta"]["normalizations"])
    assert vector_change(record, fv) is None
    assert "not the one the reference evaluated" in vector_change(record, fv * 1.001)
    assert r["meta"]["injection_probe"]["function_vector_norm"] == pytest.approx(record["norm"], rel=1e-6)


def test_a_model_with_its_own_vector_never_calls_for_fvkits(refs, zoo_model, small_dataset, small_trials):
    with pytest.raises(FvkitError, match="hidden_size 40"):
        rr.run_reference(zoo_model("tiny-gemma-hd"), small_dataset.path, small_trials, reference_src=REFERENCE_SRC,
                         baukit=BAUKIT, n_top_heads=1, edit_layer=0, max_trials=1, injected_vector=torch.ones(48))
    cfg = rr.reference_model_config(zoo_model("tiny-llama"), supplied=("function_vector",))
    assert cfg.unsupported == {}


def test_heads_are_read_only_from_the_reference_call_that_raised():
    from parity_tests.reference.stages import heads_of_failed_call

    def ranks_then_fails():
        top_heads = [(0, 1, 0.5)]
        raise RuntimeError(f"after ranking {top_heads}")

    def fails_first():
        raise RuntimeError("before ranking")

    for fn, expected in ((ranks_then_fails, [(0, 1, 0.5)]), (fails_first, None)):
        try:
            fn()
        except RuntimeError as err:
            assert heads_of_failed_call(err, fn.__code__) == expected
    try:
        ranks_then_fails()
    except RuntimeError as err:
        assert heads_of_failed_call(err, fails_first.__code__) is None


def test_meta_names_the_models_reference_release(reference_results):
    meta = reference_results["tiny-llama"]["meta"]
    assert meta["reference_transformers"] == "4.49.0"
    assert meta["release_matches"] == (transformers.__version__ == "4.49.0")


def test_supported_zoo_layouts_pick_the_reference_branch(zoo_model):
    for alias, branch in [("tiny-gptj", "gpt-j"), ("tiny-neox", "gpt-neox"), ("tiny-qwen2", "llama")]:
        cfg = rr.reference_model_config(zoo_model(alias))
        assert (cfg.branch, cfg.unsupported) == (branch, {}), alias


def test_biased_llama_out_projection_is_unsupported_for_indirect_effect():
    config = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                      hidden_size=8, intermediate_size=8, vocab_size=32, attention_bias=True)
    from fvkit.models.spec import get_spec
    lm = types.SimpleNamespace(model=transformers.LlamaForCausalLM(config), spec=get_spec("llama"), name="biased",
                               dims=types.SimpleNamespace(n_layers=2, n_heads=2, head_dim=4, hidden_size=8))
    cfg = rr.reference_model_config(lm)
    assert "bias" in cfg.unsupported["indirect_effect"]
    assert "mean_activations" not in cfg.unsupported and "baseline" not in cfg.unsupported


def test_unknown_layout_keeps_mean_activations_and_baseline(zoo_model):
    lm = _with_spec(zoo_model("tiny-llama"), blocks_path="model.decoder.layers")
    cfg = rr.reference_model_config(lm)
    assert cfg.branch is None and cfg.model_config["name_or_path"] == rr.NO_BRANCH_NAME
    assert {"indirect_effect", "function_vector", "zero_shot", "shuffled"} <= set(cfg.unsupported)
    assert "mean_activations" not in cfg.unsupported and "baseline" not in cfg.unsupported


# --- split check without a model ----------------------------------------------------------

def test_reference_split_reports_pandas_dtype_conversion(refs, tmp_path):
    digits = tmp_path / "digits.json"
    digits.write_text(json.dumps([{"input": f"{i:03d}", "output": f"{i + 1:03d}"} for i in range(20)]))
    report = rr.reference_split(refs, digits, test_size=0.3, seed=0)
    assert report["row_mismatches"], "zero-padded digits should come back from pandas as integers"
    assert report["row_mismatches"][0]["file"].startswith("0")

    words = tmp_path / "words.json"
    words.write_text(json.dumps([{"input": f"w{i}", "output": f"v{i}"} for i in range(20)]))
    clean = rr.reference_split(refs, words, test_size=0.3, seed=0)
    assert clean["row_mismatches"] == []
    assert sorted(sum(clean["split"].values(), [])) == list(range(20))


# --- command line -----------------------------------------------------------------------

def test_cli_writes_the_result_and_refuses_a_bad_path(refs, small_dataset, tmp_path, capsys):
    out = tmp_path / "result.json"
    common = ["--model", "tiny-gpt2", "--dataset", small_dataset.path, "--n-trials", "2", "--n-shots", "2",
              "--edit-layer", "1", "--n-top-heads", "2", "--out", str(out)]
    assert rr.main(common + ["--reference-src", str(tmp_path / "nowhere")] + (["--baukit", BAUKIT] if BAUKIT else [])) == 2
    assert "src/utils/extract_utils.py" in capsys.readouterr().err and not out.exists()
    assert rr.main(common + ["--reference-src", REFERENCE_SRC] + (["--baukit", BAUKIT] if BAUKIT else [])) == 0
    result = json.loads(out.read_text())
    assert np.array(result["indirect_effect"]).shape[0] == 2 and result["meta"]["settings"]["n_shots"] == 2


def test_sweep_evaluates_every_layer_as_the_single_layer_run_does(refs, zoo_model, small_dataset, small_trials):
    """``sweep=True`` adds one zero-shot and one shuffled evaluation per layer; the
    edit layer's entry equals the single-layer stages of the same run."""
    lm = zoo_model("tiny-llama")
    r = rr.run_reference(lm, small_dataset.path, small_trials, reference_src=REFERENCE_SRC, baukit=BAUKIT,
                         n_top_heads=N_TOP_HEADS, edit_layer=EDIT_LAYER, max_trials=MAX_TRIALS, sweep=True)
    assert r["meta"]["settings"]["layer_sweep"] is True and "layer_sweep" in r["meta"]["timings"]
    for stage in ("zero_shot", "shuffled"):
        layers = r["layer_sweep"][stage]
        assert len(layers) == lm.dims.n_layers
        assert layers[EDIT_LAYER] == r[stage]
        assert all(layer["clean_rank_list"] == r[stage]["clean_rank_list"] for layer in layers)
