"""Mean activations, indirect effects, the function vector and injection on tiny models."""

import types

import pytest
import torch

from fvkit.models import adapters
from fvkit.method.activations import head_inputs, mean_head_activations, to_slots
from fvkit.errors import FvkitError, SpecError
from fvkit.method.function_vector import compute_function_vector, select_top_heads
from fvkit.pipeline import indirect_effects
from fvkit.method.intervene import evaluate, inject, token_rank, topk_accuracy
from fvkit.method.stage_inputs import trial_prompt
from fvkit.method.token_labels import dummy_token_labels, slot_index_map, token_meta_labels


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama", "tiny-gemma-hd"])
def test_mean_activation_shape_uses_the_real_head_dim(zoo_model, antonym, antonym_trials, alias):
    lm = zoo_model(alias)
    mean = mean_head_activations(lm, antonym, antonym_trials, max_trials=2)
    dummy = dummy_token_labels(10, lm.tokenizer, lm.spec.prepend_bos, lm.spec.bos_text)
    assert mean.shape == (lm.dims.n_layers, lm.dims.n_heads, len(dummy), lm.dims.head_dim)
    if alias == "tiny-gemma-hd":
        assert lm.dims.n_heads * lm.dims.head_dim != lm.dims.hidden_size
    fv = compute_function_vector(lm, mean, [[0, 0, 0.0], [lm.dims.n_layers - 1, 1, 0.0]])
    assert fv.shape == (1, lm.dims.hidden_size) and fv.abs().max() > 0


def test_multi_token_word_is_averaged_into_its_slot(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-gpt2")
    data, _ = trial_prompt(lm, antonym, antonym_trials, "mean_activations", 0)
    data["examples"][1]["input"] = " antidisestablishment"
    labels, text = token_meta_labels(data, lm.tokenizer, False)
    dummy = dummy_token_labels(10, lm.tokenizer, False, lm.spec.bos_text)
    idx_map, idx_avg = slot_index_map(labels, dummy)
    lo, hi = idx_avg["demonstration_2_token"]
    stack = head_inputs(lm, lm.tokenizer([text], return_tensors="pt"))
    slots = to_slots(stack, idx_map, idx_avg, len(dummy))
    assert torch.equal(slots[:, :, idx_map[lo]], stack[:, :, lo:hi + 1].mean(axis=2))
    assert torch.equal(slots[:, :, -1], stack[:, :, -1])


def test_biased_out_projection_adds_its_bias_once_per_head(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-gpt2")
    mean = mean_head_activations(lm, antonym, antonym_trials, max_trials=1)
    o_proj = adapters.resolve_out_proj(lm.model, lm.spec, 0)
    heads = [[0, 0, 0.0], [0, 1, 0.0]]
    fv = compute_function_vector(lm, mean, heads)
    zero = torch.zeros(1, 1, lm.dims.n_heads * lm.dims.head_dim)
    bias = o_proj(zero).reshape(1, -1)
    assert bias.abs().max() > 0
    without_bias = fv - 2 * bias
    d = lm.dims.head_dim
    x = torch.zeros_like(zero)
    x[..., :d], x[..., d:2 * d] = mean[0, 0, -1], mean[0, 1, -1]
    assert torch.allclose(without_bias, (o_proj(x) - bias).reshape(1, -1), atol=1e-6)


def test_top_heads_are_ranked_and_rounded():
    ie = torch.zeros(2, 3, 4)
    ie[:, 2, 1] = 0.123456
    ie[:, 0, 3] = 0.5
    assert select_top_heads(ie, 2) == [[0, 3, 0.5], [2, 1, 0.1235]]
    with pytest.raises(FvkitError, match="outside 1..12"):
        select_top_heads(ie, 13)


def test_exact_indirect_effect_shape_and_signal(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-llama")
    mean = mean_head_activations(lm, antonym, antonym_trials, max_trials=1)
    ie = indirect_effects(lm, antonym, antonym_trials, mean, max_trials=1, mode="exact")
    assert ie.shape == (1, lm.dims.n_layers, lm.dims.n_heads)
    assert ie.abs().max() > 0
    with pytest.raises(FvkitError, match="unknown indirect-effect mode"):
        indirect_effects(lm, antonym, antonym_trials, mean, mode="slow")


class ToyBlock(torch.nn.Module):
    def __init__(self, as_tuple):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.as_tuple = as_tuple

    def forward(self, x):
        y = self.lin(x)
        return (y, None) if self.as_tuple else y


class Toy(torch.nn.Module):
    def __init__(self, as_tuple):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList([ToyBlock(as_tuple) for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            out = b(x)
            x = out[0] if isinstance(out, tuple) else out
        return x


def toy_lm(as_tuple):
    from fvkit.models.spec import ModelSpec
    spec = ModelSpec(name="toy", blocks_path="blocks", attn_path_in_block="lin", out_proj_path_in_attn="weight_holder",
                     prepend_bos=True, final_norm_path="blocks", lm_head_path="blocks").validate()
    model = Toy(as_tuple)
    return types.SimpleNamespace(model=model, spec=spec, dims=types.SimpleNamespace(hidden_size=4))


@pytest.mark.parametrize("as_tuple", [True, False], ids=["tuple-output", "tensor-output"])
def test_injection_works_for_tuple_and_tensor_blocks(as_tuple):
    lm = toy_lm(as_tuple)
    x = torch.randn(1, 3, 4)
    clean = lm.model(x)
    vec = torch.ones(1, 4)
    with inject(lm, 0, vec) as trace:
        edited = lm.model(x)
    assert trace.fired == 1
    assert torch.equal(edited[:, :-1], clean[:, :-1])           # earlier positions untouched
    assert not torch.equal(edited[:, -1], clean[:, -1])
    expected = lm.model.blocks[1].lin(lm.model.blocks[0].lin(x)[:, -1] + vec)
    assert torch.allclose(edited[:, -1], expected)


def test_injection_layer_out_of_range():
    with pytest.raises(SpecError, match=r"layer 2 is out of range for this model: valid layers are 0..1"):
        with inject(toy_lm(True), 2, torch.ones(1, 4)):
            pass


def test_evaluate_refuses_an_edit_that_changed_nothing(zoo_model, antonym, antonym_trials):
    lm = zoo_model("tiny-gpt2")
    zero = torch.zeros(1, lm.dims.hidden_size)
    with pytest.raises(FvkitError, match="did not change the output"):
        evaluate(lm, antonym, antonym_trials, "zero_shot", zero, edit_layer=1, max_items=2)


def test_rank_and_topk():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    assert [token_rank(logits, t) for t in range(4)] == [2, 0, 1, 3]
    assert topk_accuracy([0, 1, 2, 5]) == [[1, 0.25], [2, 0.5], [3, 0.75]]
