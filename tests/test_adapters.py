"""Resolving spec paths on live models, one tiny model per registered architecture."""

import dataclasses

import pytest
import torch

from fvkit.models import adapters
from fvkit.errors import SpecError
from fvkit.models.spec import all_specs, get_spec
from fvkit.models.tracer import TraceDict
from fvkit.models.zoo import TINY_PARITY_MODELS, ZOO

TINY = list(dict.fromkeys(list(TINY_PARITY_MODELS) + ["tiny-gemma-hd"]))
#: Every registered spec is exercised on some zoo model.
SPEC_MODELS = {spec.name: next(a for a, e in ZOO.items() if e.spec == spec.name) for spec in all_specs()}


def test_every_registered_spec_has_a_zoo_model():
    assert set(SPEC_MODELS) == {s.name for s in all_specs()}


@pytest.mark.parametrize("alias", TINY)
def test_resolution_on_tiny_model(zoo_model, alias):
    lm = zoo_model(alias)
    model, spec, dims = lm.model, lm.spec, lm.dims
    blocks = adapters.resolve_blocks(model, spec)
    assert len(blocks) == dims.n_layers
    for layer in range(dims.n_layers):
        block = adapters.resolve_block(model, spec, layer)
        attn = adapters.resolve_attn(model, spec, layer)
        out_proj = adapters.resolve_out_proj(model, spec, layer)
        assert block is blocks[layer]
        # The dotted names the tracer hooks must be the very modules the adapters return.
        assert model.get_submodule(adapters.block_name(spec, layer)) is block
        assert model.get_submodule(adapters.attn_name(spec, layer)) is attn
        assert model.get_submodule(adapters.out_proj_name(spec, layer)) is out_proj
        assert adapters.out_proj_in_features(out_proj) == dims.n_heads * dims.head_dim
    lm_head = adapters.resolve_lm_head(model, spec)
    assert lm_head is model.get_output_embeddings()
    assert adapters.resolve_final_norm(model, spec) is not None


@pytest.mark.smollm2
def test_resolution_on_smollm2(smollm2_available, zoo_model):
    lm = zoo_model("smollm2-135m")
    assert len(adapters.resolve_blocks(lm.model, lm.spec)) == 30
    out_proj = adapters.resolve_out_proj(lm.model, lm.spec, 29)
    assert adapters.out_proj_in_features(out_proj) == 9 * 64


@pytest.mark.parametrize("alias", TINY)
def test_hooks_on_every_out_proj_and_block_fire(zoo_model, alias):
    lm = zoo_model(alias)
    names = lm.out_proj_names() + lm.block_names()
    ids = lm.tokenizer("Q: hot\nA:", return_tensors="pt")
    with TraceDict(lm.model, names, retain_input=True) as td:
        with torch.no_grad():
            lm.model(**ids)
    assert td.not_fired == []
    assert all(td[n].fired == 1 for n in names)
    for name in lm.out_proj_names():
        assert td[name].input.shape == (1, ids["input_ids"].shape[1], lm.dims.attn_width)


def test_unused_module_hook_does_not_fire(zoo_model):
    # The check above must be able to fail: a module off the forward path never fires.
    lm = zoo_model("tiny-llama")
    stray = torch.nn.Linear(3, 3)
    lm.model.add_module("stray_for_test", stray)
    try:
        with TraceDict(lm.model, ["stray_for_test", lm.out_proj_names()[0]]) as td:
            lm.model(**lm.tokenizer("a", return_tensors="pt"))
        assert td.not_fired == ["stray_for_test"]
    finally:
        del lm.model.stray_for_test


def test_wrong_path_names_path_and_children(zoo_model):
    lm = zoo_model("tiny-llama")
    with pytest.raises(SpecError) as err:
        adapters.resolve_blocks(lm.model, get_spec("gpt2"))
    msg = str(err.value)
    assert "blocks_path='transformer.h'" in msg
    assert "'transformer' is not a child of '<model root>'" in msg
    assert "model, lm_head" in msg and "--model-spec" in msg


def test_wrong_inner_path_names_the_resolved_part(zoo_model):
    lm = zoo_model("tiny-llama")
    spec = dataclasses.replace(get_spec("llama"), out_proj_path_in_attn="c_proj")
    with pytest.raises(SpecError, match=r"out_proj_path_in_attn='c_proj'.*children there: q_proj, k_proj, v_proj, o_proj"):
        adapters.resolve_out_proj(lm.model, spec, 0)


def test_blocks_path_must_be_a_list(zoo_model):
    lm = zoo_model("tiny-llama")
    spec = dataclasses.replace(get_spec("llama"), blocks_path="model.norm")
    with pytest.raises(SpecError, match="not a non-empty list of decoder blocks"):
        adapters.resolve_blocks(lm.model, spec)


def test_lm_head_alternatives(zoo_model):
    # GPT-NeoX's output embedding is 'embed_out' in transformers 4.x and 'lm_head' in 5.x.
    lm = zoo_model("tiny-neox")
    assert adapters.resolve_lm_head(lm.model, lm.spec) is lm.model.get_output_embeddings()
    spec = dataclasses.replace(lm.spec, lm_head_path="unembed|head")
    with pytest.raises(SpecError, match=r"lm_head_path='unembed'.*none of the alternatives \['unembed', 'head'\]"):
        adapters.resolve_lm_head(lm.model, spec)


@pytest.mark.parametrize("layer", [-1, 3, 99, "1"])
def test_layer_out_of_range(zoo_model, layer):
    lm = zoo_model("tiny-llama")
    with pytest.raises(SpecError, match=r"layer .* is out of range for this model: valid layers are 0..2"):
        adapters.resolve_out_proj(lm.model, lm.spec, layer)


def test_out_proj_in_features_kinds():
    from transformers.pytorch_utils import Conv1D

    assert adapters.out_proj_in_features(torch.nn.Linear(48, 40)) == 48
    assert adapters.out_proj_in_features(Conv1D(40, 48)) == 48  # Conv1D(nf=out, nx=in)
    with pytest.raises(SpecError, match="cannot tell the input width of out-projection ReLU"):
        adapters.out_proj_in_features(torch.nn.ReLU())
