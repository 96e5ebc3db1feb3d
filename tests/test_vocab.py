"""Decoding a vector through each architecture's final norm and unembedding."""

import dataclasses

import pytest
import torch

from fvkit.models import adapters
from fvkit.errors import FvkitError, SpecError
from fvkit.models.tracer import Trace, first_tensor
from fvkit.report.vocab import decode_vector, vector_logits
from fvkit.models.zoo import TINY_PARITY_MODELS

#: One hidden state through norm and unembedding, against the same rows inside the
#: model's batched forward pass: float32 matmul ordering noise (~4e-6 seen), no more.
LOGIT_ABS_TOL = 1e-4
PROMPT = "Q: hot\nA: cold\n\nQ: up\nA:"


def last_hidden_and_logits(lm):
    inputs = lm.tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad(), Trace(lm.model, adapters.block_name(lm.spec, lm.dims.n_layers - 1)) as trace:
        logits = lm.model(**inputs).logits[0, -1]
    return first_tensor(trace.output)[0, -1], logits


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_decoding_the_last_hidden_state_gives_the_models_own_prediction(alias, zoo_model):
    lm = zoo_model(alias)
    hidden, logits = last_hidden_and_logits(lm)
    assert (vector_logits(lm, hidden) - logits).abs().max().item() < LOGIT_ABS_TOL
    decoded = decode_vector(lm, hidden, k=5)
    probs = torch.softmax(logits, dim=-1)
    expected = [lm.tokenizer.decode([int(i)]) for i in torch.topk(probs, 5).indices]
    assert [t for t, _ in decoded] == expected
    assert all(isinstance(p, float) for _, p in decoded)
    assert [p for _, p in decoded] == sorted((p for _, p in decoded), reverse=True)


def test_skipping_the_final_norm_is_caught(zoo_model, monkeypatch):
    lm = zoo_model("tiny-llama")
    hidden, logits = last_hidden_and_logits(lm)
    monkeypatch.setattr(adapters, "resolve_final_norm", lambda model, spec: torch.nn.Identity())
    assert (vector_logits(lm, hidden) - logits).abs().max().item() > LOGIT_ABS_TOL


def test_a_wrong_spec_path_is_one_clear_error(zoo_model):
    lm = zoo_model("tiny-gpt2")
    broken = dataclasses.replace(lm, spec=dataclasses.replace(lm.spec, final_norm_path="transformer.norm"))
    with pytest.raises(SpecError, match="final_norm_path='transformer.norm'"):
        decode_vector(broken, torch.ones(1, lm.dims.hidden_size))


def test_bad_vector_and_k(zoo_model):
    lm = zoo_model("tiny-gpt2")
    with pytest.raises(FvkitError, match="hidden size is 36"):
        decode_vector(lm, torch.ones(5))
    with pytest.raises(FvkitError, match="positive number"):
        decode_vector(lm, torch.ones(1, 36), k=0)


def test_a_config_softcap_caps_the_logits(zoo_model, monkeypatch):
    lm = zoo_model("tiny-gpt2")
    hidden, _ = last_hidden_and_logits(lm)
    assert vector_logits(lm, hidden).abs().max().item() > 1.0
    monkeypatch.setattr(lm.model.config, "final_logit_softcapping", 1.0, raising=False)
    assert vector_logits(lm, hidden).abs().max().item() <= 1.0
