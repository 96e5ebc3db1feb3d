"""The vector as the block writes it, and every vector's size against the residual stream.

A tiny Gemma 2 model (built here from a config: its blocks normalise the
attention output with ``post_attention_layernorm`` before the residual add,
and 3 heads x 16 = 48 != hidden 36, like Gemma 3) serves the block-written
vector; tiny-llama, whose blocks add the out-projection output as it is, serves
the reference-defined vector alone.
"""

import dataclasses
import json
import warnings

import pytest
import torch

from fvkit.errors import InjectionWarning, SpecError
from fvkit.method.block_vector import block_written_vector, heads_by_layer, layer_attention_input
from fvkit.method.fixed_trials import FixedTrials
from fvkit.method.function_vector import compute_function_vector
from fvkit.method.vector_scale import (MIN_VECTOR_TO_RESIDUAL, residual_norms, vector_scale,
                                       warn_if_negligible)
from fvkit.models import adapters
from fvkit.models.architectures.architecture import ModelSpec
from fvkit.models.architectures.layouts import LLAMA_STYLE_PATHS
from fvkit.models.architectures.recipe_constants import MAX_POSITIONS, SP_IDS, SP_VOCAB
from fvkit.models.config import dims_from_config
from fvkit.models.loader import LoadedModel, resolve_all_layers
from fvkit.pipeline import run_files, run_pipeline

#: Gemma 2's layout with its attention-output norm declared; used unregistered, so the
#: spec registry that other tests list stays as it is.
GEMMA2_SPEC = ModelSpec(name="gemma2-test", **LLAMA_STYLE_PATHS, prepend_bos=True,
                        attn_output_norm="post_attention_layernorm").validate()
#: Top heads of the hand computation: two in layer 0 (summed before the norm), one in layer 2.
HEADS = [[0, 1, 0.5], [2, 0, 0.4], [0, 2, 0.3]]


@pytest.fixture(scope="module")
def tiny_gemma2(zoo_model):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=SP_VOCAB, hidden_size=36, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=MAX_POSITIONS, sliding_window=64,
        query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=False, **SP_IDS)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval().requires_grad_(False)
    with torch.no_grad():
        # Norm weights away from their neutral zero, so that using the wrong norm
        # (or none) changes the vector.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.5)
    dims = dims_from_config(config, GEMMA2_SPEC)
    resolve_all_layers(model, GEMMA2_SPEC, dims)
    return LoadedModel(model=model, tokenizer=zoo_model("tiny-gemma").tokenizer, spec=GEMMA2_SPEC, dims=dims,
                       name="tiny-gemma2", source="config")


@pytest.fixture(scope="module")
def few_trials(antonym):
    """Two trials of three shots and a test split of a few items: the evaluations stay short."""
    return FixedTrials.make(antonym, n_trials=2, n_shots=3, seed=0, test_size=0.02)


def _mean_acts(lm):
    torch.manual_seed(1)
    d = lm.dims
    return torch.randn(d.n_layers, d.n_heads, 4, d.head_dim)


def test_block_written_vector_is_what_the_blocks_write(tiny_gemma2):
    """Run the model with only the top heads active at the last token (the out-projection's
    input replaced by their mean activations) and read each block's attention-output norm:
    its outputs there, summed over the layers, are the vector."""
    lm = tiny_gemma2
    mean_acts = _mean_acts(lm)
    grouped = heads_by_layer(HEADS)
    written = {}
    handles = []
    for layer, heads in grouped.items():
        block = adapters.resolve_block(lm.model, lm.spec, layer)
        x = layer_attention_input(lm, mean_acts, layer, heads)

        def only_top_heads(module, args, x=x):
            edited = args[0].clone()
            edited[:, -1] = x[0, 0]
            return (edited,) + tuple(args[1:])

        def read_norm(module, args, output, layer=layer):
            written[layer] = output[0, -1].clone()

        handles.append(block.self_attn.o_proj.register_forward_pre_hook(only_top_heads))
        handles.append(block.post_attention_layernorm.register_forward_hook(read_norm))
    try:
        lm.model(**lm.tokenizer(["Q: hot\nA:"], return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    by_hand = sum(written.values())
    vector = block_written_vector(lm, mean_acts, HEADS)
    assert sorted(written) == [0, 2]
    assert vector.shape == (1, lm.dims.hidden_size)
    torch.testing.assert_close(vector[0], by_hand, rtol=1e-5, atol=1e-6)
    # It is not the reference's vector (no norm), nor the norm applied per head.
    reference = compute_function_vector(lm, mean_acts, HEADS)
    assert not torch.allclose(vector, reference, rtol=1e-2, atol=1e-3)
    per_head = sum(block_written_vector(lm, mean_acts, [h]) for h in HEADS)
    assert not torch.allclose(vector, per_head, rtol=1e-2, atol=1e-3)


def test_no_norm_no_block_written_vector(zoo_model):
    lm = zoo_model("tiny-llama")
    assert lm.spec.attn_output_norm is None
    assert block_written_vector(lm, _mean_acts(lm), HEADS[:1]) is None
    assert adapters.resolve_attn_output_norm(lm.model, lm.spec, 0) is None


def test_a_wrong_norm_path_fails_at_load(zoo_model):
    lm = zoo_model("tiny-llama")
    spec = dataclasses.replace(lm.spec, attn_output_norm="post_attn_norm")
    with pytest.raises(SpecError, match="attn_output_norm='post_attn_norm' does not resolve.*post_attention_layernorm"):
        resolve_all_layers(lm.model, spec, lm.dims)
    with pytest.raises(SpecError, match="'attn_output_norm'='a..b' must be None or one dotted module path"):
        dataclasses.replace(lm.spec, attn_output_norm="a..b").validate()


def test_vector_scale_and_the_one_percent_warning():
    norms = [100.0, 300.0]
    big = vector_scale(torch.full((1, 4), 2.0), norms, layer=3)     # norm 4 of a 200 stream
    assert big["vector_norm"] == pytest.approx(4.0)
    assert big["residual_norm"] == pytest.approx(200.0)
    assert big["ratio"] == pytest.approx(0.02) and not big["negligible"]
    assert "block 3" in big["measured"] and "2 zero-shot and shuffled-label" in big["measured"]
    small = vector_scale(torch.full((1, 4), 0.5), norms, layer=3)   # 1 of 200: 0.5%
    assert small["ratio"] == pytest.approx(0.005)
    assert small["ratio"] < MIN_VECTOR_TO_RESIDUAL and small["negligible"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_negligible(big, "the vector") is False
    with pytest.warns(InjectionWarning, match=r"the vector has norm 1, 0\.500% of the residual stream's 200 "
                                              r"at layer 3 \(below 1%\)"):
        assert warn_if_negligible(small, "the vector") is True


def test_residual_norms_read_the_edit_layer_output(zoo_model, antonym, few_trials):
    lm = zoo_model("tiny-llama")
    norms = residual_norms(lm, antonym, few_trials, layer=1)
    n = few_trials.n_items("zero_shot") + few_trials.n_items("shuffled")
    assert len(norms) == n and all(v > 0 for v in norms)
    # Another layer's stream has other norms: the hook reads the layer asked for.
    assert residual_norms(lm, antonym, few_trials, layer=2) != norms


@pytest.mark.filterwarnings("ignore::fvkit.errors.InjectionWarning")
def test_run_reports_both_vectors_on_gemma2(tiny_gemma2, antonym, few_trials):
    result = run_pipeline(tiny_gemma2, antonym, few_trials, n_top_heads=4, edit_layer=1, max_trials=1,
                          ie_mode="exact", show_progress=False, block_written=True)
    written = result.block_written
    assert written["attn_output_norm"] == "post_attention_layernorm"
    torch.testing.assert_close(written["vector"],
                               block_written_vector(tiny_gemma2, result.mean_activations, result.top_heads))
    assert set(result.vector_scale) == {"function_vector", "block_written_vector"}
    for stage in ("zero_shot", "shuffled"):
        assert written[stage]["n_items"] == few_trials.n_items(stage)
        # Same prompts, same clean passes: only the vector differs.
        assert written[stage]["clean_rank_list"] == getattr(result, stage)["clean_rank_list"]
    # The parity layout never carries it.
    assert "block_written" not in json.dumps(list(result.comparable()))
    files = run_files(result)
    run = json.loads(files["run.json"])
    assert run["vector_scale"]["block_written_vector"]["ratio"] == pytest.approx(
        result.vector_scale["block_written_vector"]["ratio"])
    summary = run["block_written_vector"]
    assert set(summary["zero_shot"]) == {"function_vector", "block_written_vector"}
    assert summary["zero_shot"]["block_written_vector"]["top1_no_vector"] == written["zero_shot"]["clean_topk"][0][1]
    assert torch.load(__import__("io").BytesIO(files["block_written_vector.pt"])).shape == (1, 36)
    assert set(json.loads(files["eval_block_written.json"])) == {"zero_shot", "shuffled"}
    # Without being asked (the parity gates), nothing of it is built.
    plain = run_pipeline(tiny_gemma2, antonym, few_trials, n_top_heads=4, edit_layer=1, max_trials=1,
                         ie_mode="exact", show_progress=False)
    assert plain.block_written is None and set(plain.vector_scale) == {"function_vector"}
    assert "block_written_vector.pt" not in run_files(plain)


def test_a_negligible_vector_warns_and_says_so_in_run_json(zoo_model, antonym, few_trials, monkeypatch):
    import fvkit.pipeline as pipeline

    lm = zoo_model("tiny-llama")
    shrunk = lambda *args: compute_function_vector(*args) * 1e-4
    monkeypatch.setattr(pipeline, "compute_function_vector", shrunk)
    with pytest.warns(InjectionWarning, match="the reference-defined function vector has norm"):
        result = run_pipeline(lm, antonym, few_trials, n_top_heads=3, edit_layer=1, max_trials=1,
                              show_progress=False, block_written=True)
    assert result.block_written is None      # llama declares no attention-output norm
    run = json.loads(run_files(result)["run.json"])
    assert run["vector_scale"]["function_vector"]["negligible"] is True
    assert len(run["warnings"]) == 1 and "below 1%" in run["warnings"][0]


def test_a_full_size_vector_does_not_warn(zoo_model, antonym, few_trials):
    lm = zoo_model("tiny-llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InjectionWarning)
        result = run_pipeline(lm, antonym, few_trials, n_top_heads=3, edit_layer=1, max_trials=1,
                              show_progress=False)
    assert result.scale_warnings() == []
    assert result.vector_scale["function_vector"]["ratio"] > MIN_VECTOR_TO_RESIDUAL


@pytest.mark.filterwarnings("ignore::fvkit.errors.InjectionWarning")
def test_fvkit_run_writes_both_vectors_and_the_page_shows_them(tiny_gemma2, few_trials, tmp_path, monkeypatch,
                                                               capsys):
    from fvkit.cli.main import main
    from fvkit.models import spec as model_spec

    model_dir = tmp_path / "tiny-gemma2"
    tiny_gemma2.model.save_pretrained(model_dir)
    tiny_gemma2.tokenizer.save_pretrained(model_dir)
    monkeypatch.setitem(model_spec._REGISTRY, GEMMA2_SPEC.name, GEMMA2_SPEC)
    trials_file = tmp_path / "trials.json"
    few_trials.save(trials_file)
    out = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--model-spec", GEMMA2_SPEC.name, "--dataset", "antonym",
                 "--fixed-trials", str(trials_file), "--max-trials", "1", "--n-top-heads", "4", "--edit-layer", "1",
                 "--ie-mode", "exact", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "block written vector: norm" in printed and "vector as the block writes it" in printed
    for name in ("block_written_vector.pt", "eval_block_written.json"):
        assert (out / name).is_file()
    run = json.loads((out / "run.json").read_text())
    assert set(run["vector_scale"]) == {"function_vector", "block_written_vector"}
    assert run["block_written_vector"]["attn_output_norm"] == "post_attention_layernorm"
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Vector size against the residual stream" in page and "The vector as the block writes it" in page
    assert "mean L2 norm of the output of block 1 at the last token" in page
    # This random Gemma 2's reference-defined vector is below 1% of its residual stream.
    assert run["vector_scale"]["function_vector"]["negligible"]
    assert run["warnings"] and run["warnings"][0].startswith("the reference-defined function vector has norm")
    assert "warning: the reference-defined function vector has norm" in page
