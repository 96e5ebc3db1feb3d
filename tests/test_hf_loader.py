"""load_model: sources, spec choice, parity-mode refusals, clear failures, diagnostics."""

import dataclasses
import importlib.util
import json
import os
import shutil

import pytest
import torch

from fvkit.models import loader as hf_loader, spec as model_spec, zoo
from fvkit.errors import FvkitError, ParityModeError, SpecError
from fvkit.models.loader import load_model
from fvkit.models.spec import get_spec, register
from fvkit.models.zoo import TINY_PARITY_MODELS, EXPECTED_WEIGHTS_SHA256, ZOO

TINY = list(dict.fromkeys(list(TINY_PARITY_MODELS) + ["tiny-gemma-hd"]))


@pytest.fixture
def counted():
    """Asserts afterwards how many models the test loaded."""
    start = hf_loader.load_count()

    def loaded():
        return hf_loader.load_count() - start

    return loaded


@pytest.mark.parametrize("alias", TINY)
def test_zoo_model_is_ready_for_parity(zoo_model, alias):
    import transformers

    lm = zoo_model(alias)
    assert lm.name == alias and lm.spec.name == ZOO[alias].spec
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
    assert lm.model.config._attn_implementation == "eager"
    assert lm.weights_sha256 == EXPECTED_WEIGHTS_SHA256[alias]
    d = lm.diagnostics()
    assert d["spec"] == lm.spec.name and d["dims"] == lm.dims.as_dict()
    assert d["tokenizer_adds_bos"] is lm.spec.prepend_bos
    assert d["transformers"] == transformers.__version__ and d["torch"] == torch.__version__
    assert [x["out_proj"] for x in d["layers"]] == lm.out_proj_names()
    assert all(x["out_proj_in_features"] == lm.dims.attn_width for x in d["layers"])
    table = lm.diagnostics_table()
    for needle in [lm.spec.name, type(lm.tokenizer).__name__, lm.weights_sha256, *lm.out_proj_names()]:
        assert needle in table


def test_load_counter(counted):
    load_model("tiny-gpt2")
    load_model("tiny-gpt2")
    assert counted() == 2


# --- Spec choice ------------------------------------------------------------------------------

def test_explicit_spec_wins(counted):
    lm = load_model("tiny-mistral", model_spec="llama")  # same module layout, other BOS policy
    assert lm.spec.name == "llama" and counted() == 1


def test_exported_directory_keeps_its_spec(tmp_path):
    target = zoo.export_model("tiny-olmo", str(tmp_path / "checkpoint"))
    lm = load_model(target)
    assert lm.spec.name == "olmo" and lm.weights_sha256 == EXPECTED_WEIGHTS_SHA256["tiny-olmo"]
    assert lm.source == target


def test_plain_directory_gets_spec_from_architectures(tmp_path):
    target = zoo.export_model("tiny-mistral", str(tmp_path / "checkpoint"))
    os.remove(os.path.join(target, zoo.METADATA_FILE))
    lm = load_model(target)
    assert lm.spec.name == "mistral" and lm.weights_sha256 is None


def test_directory_name_selects_spec_before_architectures(tmp_path):
    # A LLaMA-architecture SmolLM2 is told apart from LLaMA by its id, before architectures.
    from fvkit.cli.models import check_bos_policy

    target = zoo.export_model("tiny-llama", str(tmp_path / "my-smollm2-copy"))
    os.remove(os.path.join(target, zoo.METADATA_FILE))
    lm = load_model(target)
    assert lm.spec.name == "smollm2"
    # The paths fit (same layout); the BOS policy does not, and `fvkit resolve` says so.
    with pytest.raises(SpecError, match="prepend_bos=False, but this tokenizer adds a BOS token"):
        check_bos_policy(lm)


# --- Wrong spec -------------------------------------------------------------------------------

def test_wrong_spec_fails_at_load_naming_the_path(counted):
    with pytest.raises(SpecError) as err:
        load_model("tiny-llama", model_spec="gpt2")
    msg = str(err.value)
    assert "ModelSpec 'gpt2'" in msg and "blocks_path='transformer.h'" in msg
    assert "'transformer' is not a child" in msg and "--model-spec" in msg
    assert counted() == 0


def test_out_projection_width_is_checked(monkeypatch):
    monkeypatch.setattr(model_spec, "_REGISTRY", dict(model_spec._REGISTRY))
    register(dataclasses.replace(get_spec("gemma"), name="gemma-qproj", out_proj_path_in_attn="q_proj"))
    with pytest.raises(SpecError, match=r"self_attn.q_proj reads 40 features, not n_heads\*head_dim = 3\*16 = 48"):
        load_model("tiny-gemma-hd", model_spec="gemma-qproj")


def test_unknown_spec_name_fails_first(counted):
    with pytest.raises(SpecError, match="unknown model spec 'llama3'"):
        load_model("tiny-llama", model_spec="llama3")
    assert counted() == 0


# --- Parity mode ------------------------------------------------------------------------------

@pytest.mark.parametrize("setting,value,fix", [
    ("device", "cuda", "cpu"), ("device", "mps", "cpu"),
    ("dtype", "fp16", "fp32"), ("dtype", "bf16", "fp32"),
    ("quant", "8bit", "none"), ("quant", "4bit", "none"),
])
def test_parity_mode_refusals(counted, setting, value, fix):
    with pytest.raises(ParityModeError) as err:
        load_model("tiny-llama", **{setting: value})
    msg = str(err.value)
    assert f"{setting}={value}" in msg and f"--{setting} {fix}" in msg and "parity=False" in msg
    assert counted() == 0


def test_non_parity_half_precision_on_cpu():
    lm = load_model("tiny-llama", dtype="bf16", parity=False)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.weights_sha256 is None and lm.diagnostics()["dtype"] == "bf16"


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="fp8"), "unknown dtype 'fp8'; choose one of fp32, fp16, bf16"),
    (dict(quant="2bit"), "unknown quant '2bit'"),
    (dict(device="tpu9"), "unknown device 'tpu9'"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(FvkitError, match=message):
        load_model("tiny-llama", parity=False, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_unavailable_device():
    with pytest.raises(FvkitError, match="device 'cuda' is not available on this machine"):
        load_model("tiny-llama", device="cuda", parity=False)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None,
                    reason="checks the message where bitsandbytes is missing")
def test_quantization_needs_bitsandbytes():
    with pytest.raises(FvkitError, match="quant=4bit needs the bitsandbytes package"):
        load_model("tiny-llama", quant="4bit", parity=False)


# --- Unknown models ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["no-such-model-xyz", "acme/no-such-model", "/nonexistent/checkpoint",
                                  "./relative/missing"])
def test_unknown_model_is_one_clear_error(counted, name):
    with pytest.raises(FvkitError) as err:
        load_model(name)
    msg = str(err.value)
    assert f"cannot load model '{name}'" in msg
    for alias in TINY_PARITY_MODELS:
        assert alias in msg
    assert counted() == 0


def test_directory_without_config(tmp_path):
    with pytest.raises(FvkitError, match="the directory holds no loadable config.json"):
        load_model(str(tmp_path))


def test_damaged_weights_are_detected(tmp_path):
    from safetensors.torch import load_file, save_file

    target = zoo.export_model("tiny-qwen2", str(tmp_path / "damaged"))
    path = os.path.join(target, "model.safetensors")
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 0.5
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(FvkitError, match="files are damaged. Delete .* and load it again"):
        load_model(target)


def test_metadata_spec_is_validated(tmp_path):
    target = zoo.export_model("tiny-qwen2", str(tmp_path / "meta"))
    meta_path = os.path.join(target, zoo.METADATA_FILE)
    with open(meta_path) as fh:
        meta = json.load(fh)
    meta["spec"] = "no-such-spec"
    with open(meta_path, "w") as fh:
        json.dump(meta, fh)
    with pytest.raises(SpecError, match="unknown model spec 'no-such-spec'"):
        load_model(target)


def test_copied_cache_directory_loads(tmp_path, zoo_model):
    # A cache directory copied elsewhere stays loadable and keeps its identity.
    src = zoo.ensure_built("tiny-neox")
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    lm = load_model(str(dst))
    ids = lm.tokenizer("<|endoftext|>Q: up\nA:", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(lm.model(**ids).logits, zoo_model("tiny-neox").model(**ids).logits)


# --- describe_model: spec and dimensions from the config alone ----------------------------------

@pytest.fixture
def no_weights(monkeypatch, counted):
    """Fails a test that loads a model's weights."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("describe_model loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    yield
    assert counted() == 0


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-gemma-hd"])
def test_describe_model_matches_load_model(zoo_model, alias):
    lm = zoo_model(alias)
    described = hf_loader.describe_model(alias)
    assert described.name == alias and described.source == lm.source
    assert described.spec == lm.spec and described.dims == lm.dims
    assert described.config.architectures == lm.model.config.architectures


def test_describe_model_loads_no_weights(no_weights, tmp_path):
    described = hf_loader.describe_model("tiny-llama")
    assert (described.spec.name, described.dims.n_layers, described.dims.n_heads) == ("llama", 3, 4)
    assert hf_loader.describe_model("tiny-mistral", model_spec="llama").spec.name == "llama"
    target = zoo.export_model("tiny-mistral", str(tmp_path / "checkpoint"))
    os.remove(os.path.join(target, zoo.METADATA_FILE))
    assert hf_loader.describe_model(target).spec.name == "mistral"  # from config.architectures


@pytest.mark.parametrize("name", ["no-such-model-xyz", "/nonexistent/checkpoint", "./relative/missing"])
def test_describe_model_fails_as_load_model_does(no_weights, name):
    with pytest.raises(FvkitError) as described:
        hf_loader.describe_model(name)
    with pytest.raises(FvkitError) as loaded:
        load_model(name)
    assert str(described.value) == str(loaded.value)
    assert f"cannot load model '{name}'" in str(described.value) and "tiny-llama" in str(described.value)


def test_describe_model_clear_failures(no_weights, tmp_path):
    with pytest.raises(FvkitError, match="the directory holds no loadable config.json"):
        hf_loader.describe_model(str(tmp_path))
    with pytest.raises(SpecError, match="unknown model spec 'llama3'"):
        hf_loader.describe_model("tiny-llama", model_spec="llama3")
