"""Reading model dimensions from configs with any attribute names."""

import dataclasses
from types import SimpleNamespace

import pytest

from fvkit.errors import SpecError
from fvkit.models.config import ModelDims, dims_from_config
from fvkit.models.spec import get_spec
from fvkit.models.zoo import TINY_PARITY_MODELS


def test_gemma_head_dim_is_read_not_derived(zoo_model):
    lm = zoo_model("tiny-gemma-hd")
    dims = lm.dims
    assert dims == ModelDims(n_layers=2, n_heads=3, head_dim=16, hidden_size=40, n_kv_heads=1,
                             vocab_size=32000)
    assert dims.attn_width == 48 != dims.hidden_size
    assert dims.hidden_size // dims.n_heads != dims.head_dim
    o_proj = lm.model.get_submodule(lm.out_proj_names()[0])
    assert (o_proj.in_features, o_proj.out_features) == (48, 40)


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_dims_match_module_shapes(zoo_model, alias):
    lm = zoo_model(alias)
    emb = lm.model.get_input_embeddings().weight
    assert emb.shape == (lm.dims.vocab_size, lm.dims.hidden_size)
    assert len(lm.model.get_submodule(lm.spec.blocks_path)) == lm.dims.n_layers


def test_gpt2_style_names():
    config = SimpleNamespace(n_layer=3, n_head=3, n_embd=36, vocab_size=50257)
    dims = dims_from_config(config, get_spec("gpt2"))
    assert dims == ModelDims(3, 3, 12, 36, 3, 50257)


def test_grouped_query_and_explicit_head_dim():
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                             hidden_size=48, head_dim=10, vocab_size=100)
    dims = dims_from_config(config, get_spec("mistral"))
    assert (dims.n_kv_heads, dims.head_dim, dims.attn_width) == (2, 10, 60)


def test_head_dim_none_falls_back_to_division():
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, head_dim=None,
                             hidden_size=40, vocab_size=100)
    assert dims_from_config(config, get_spec("llama")).head_dim == 10


def test_nested_text_config():
    text = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=40, vocab_size=9)
    outer = SimpleNamespace(get_text_config=lambda: text)
    assert dims_from_config(outer, get_spec("llama")).n_layers == 2


def test_missing_dimension_names_candidates():
    config = SimpleNamespace(num_attention_heads=4, hidden_size=40, vocab_size=9)
    with pytest.raises(SpecError, match=r"none of \['num_hidden_layers', 'n_layer'.*number of layers"):
        dims_from_config(config, get_spec("llama"))


def test_indivisible_hidden_without_head_dim():
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=3, hidden_size=40, vocab_size=9)
    with pytest.raises(SpecError, match="not divisible by 3 heads; set head_dim"):
        dims_from_config(config, get_spec("llama"))


def test_bad_kv_heads():
    config = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=3,
                             hidden_size=40, vocab_size=9)
    with pytest.raises(SpecError, match="4 attention heads and 3 key/value heads"):
        dims_from_config(config, get_spec("llama"))


def test_malformed_value():
    config = SimpleNamespace(num_hidden_layers="2", num_attention_heads=4, hidden_size=40, vocab_size=9)
    with pytest.raises(SpecError, match="'num_hidden_layers'.*not a positive integer"):
        dims_from_config(config, get_spec("llama"))


@pytest.mark.parametrize("field,value", [("n_layers", 4), ("n_heads", 8), ("head_dim", 5), ("hidden_size", 64)])
def test_spec_static_dims_are_checked(zoo_model, field, value):
    lm = zoo_model("tiny-llama")
    spec = dataclasses.replace(lm.spec, name="pinned", **{field: value})
    actual = getattr(lm.dims, field)
    with pytest.raises(SpecError) as err:
        dims_from_config(lm.model.config, spec)
    msg = str(err.value)
    assert f"'pinned'" in msg and f"'{field}' is {value}" in msg and f"says {actual}" in msg
    # The same spec with the right value passes.
    ok = dataclasses.replace(lm.spec, name="pinned", **{field: actual})
    assert dims_from_config(lm.model.config, ok) == lm.dims
