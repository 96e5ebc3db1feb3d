"""ModelSpec validation, registry and spec lookup."""

import dataclasses

import pytest

from fvkit.models import spec as model_spec
from fvkit.errors import SpecError
from fvkit.models.spec import (ALTERNATIVE_FIELDS, PATH_FIELDS, ModelSpec, all_specs, find_spec,
                              get_spec, register, spec_names)

#: Architectures every release of fvkit must serve.
REQUIRED_SPECS = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "gemma", "olmo", "qwen2", "smollm2")


def _valid(**overrides) -> ModelSpec:
    base = dict(name="test-spec", blocks_path="model.layers", attn_path_in_block="self_attn",
                out_proj_path_in_attn="o_proj", final_norm_path="model.norm",
                lm_head_path="lm_head", prepend_bos=True)
    base.update(overrides)
    return ModelSpec(**base)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so registering in a test leaves no trace."""
    monkeypatch.setattr(model_spec, "_REGISTRY", dict(model_spec._REGISTRY))
    return model_spec._REGISTRY


def test_required_specs_are_registered():
    assert set(REQUIRED_SPECS) <= set(spec_names())


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.name)
def test_registered_specs_validate(spec):
    assert spec.validate() is spec
    assert get_spec(spec.name) is spec


@pytest.mark.parametrize("field", PATH_FIELDS)
@pytest.mark.parametrize("bad", ["", "   ", None], ids=["empty", "blank", "missing"])
def test_missing_path_field_fails_at_registration(registry, field, bad):
    with pytest.raises(SpecError) as err:
        register(_valid(name="broken-spec", **{field: bad}))
    assert "broken-spec" in str(err.value) and field in str(err.value)
    assert "broken-spec" not in registry


@pytest.mark.parametrize("field", PATH_FIELDS)
def test_empty_path_component_fails(registry, field):
    with pytest.raises(SpecError, match=f"'broken-spec'.*{field}.*empty path component"):
        register(_valid(name="broken-spec", **{field: "model..layers"}))


@pytest.mark.parametrize("field", PATH_FIELDS)
def test_alternatives_only_where_allowed(registry, field):
    spec = _valid(name="alt-spec", **{field: "a.b|c.d"})
    if field in ALTERNATIVE_FIELDS:
        assert register(spec) is spec
    else:
        with pytest.raises(SpecError, match=f"'alt-spec'.*{field}.*alternatives"):
            register(spec)


def test_empty_alternative_fails(registry):
    with pytest.raises(SpecError, match="lm_head_path.*empty path component"):
        register(_valid(name="alt-spec", lm_head_path="lm_head|"))


def test_bos_policy_needs_bos_text(registry):
    with pytest.raises(SpecError, match="'no-bos'.*bos_text"):
        register(_valid(name="no-bos", prepend_bos=False, bos_text=""))
    with pytest.raises(SpecError, match="prepend_bos"):
        register(_valid(name="no-bos", prepend_bos="yes"))


@pytest.mark.parametrize("field", ["n_layers", "n_heads", "head_dim", "hidden_size"])
def test_static_dims_must_be_positive(registry, field):
    with pytest.raises(SpecError, match=f"'dims'.*{field}"):
        register(_valid(name="dims", **{field: 0}))
    register(_valid(name="dims", **{field: 7}))


def test_duplicate_name_is_refused(registry):
    with pytest.raises(SpecError, match="'llama' is already registered"):
        register(dataclasses.replace(get_spec("llama")))
    register(dataclasses.replace(get_spec("llama"), description="changed"), replace=True)
    assert get_spec("llama").description == "changed"


def test_unknown_spec_lists_registered_names():
    with pytest.raises(SpecError) as err:
        get_spec("no-such-spec")
    for name in REQUIRED_SPECS:
        assert name in str(err.value)


@pytest.mark.parametrize("model_id,architectures,expected", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", ["LlamaForCausalLM"], "smollm2"),
    ("meta-llama/Llama-2-7b-hf", ["LlamaForCausalLM"], "llama"),
    ("gpt2-xl", None, "gpt2"),
    ("EleutherAI/gpt-j-6b", None, "gptj"),
    ("EleutherAI/pythia-70m", None, "gpt_neox"),
    ("/some/dir/checkpoint", ["Qwen2ForCausalLM"], "qwen2"),
    ("/some/dir/checkpoint", ["GemmaForCausalLM"], "gemma"),
    ("", ["OlmoForCausalLM"], "olmo"),
    ("", ["MistralForCausalLM"], "mistral"),
])
def test_find_spec(model_id, architectures, expected):
    assert find_spec(model_id, architectures).name == expected


def test_find_spec_failure_names_model_and_fix():
    with pytest.raises(SpecError) as err:
        find_spec("acme/mystery-7b", ["MysteryForCausalLM"])
    msg = str(err.value)
    assert "acme/mystery-7b" in msg and "MysteryForCausalLM" in msg and "--model-spec" in msg
