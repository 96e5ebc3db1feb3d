"""M4's decoding check (fvkit.parity.vocab_check): fvkit's decoded function vector must be the
model's own forward pass's, and a decoding that skips the final norm fails."""

import pytest
import torch

from fvkit.models.zoo import ZOO
from fvkit.parity.tolerances import VOCAB_LOGITS_REL_TOL
from fvkit.parity.vocab_check import decoding_check, forward_logits
from fvkit.report import vocab

TINY = [alias for alias, entry in ZOO.items() if entry.source == "random"]


def vector(lm, seed=0):
    """A function-vector-sized random vector of the scale of a residual stream entry."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, lm.dims.hidden_size, generator=g) * 3.0


@pytest.mark.parametrize("alias", TINY)
def test_fvkit_decodes_as_the_model_does(zoo_model, alias):
    lm = zoo_model(alias)
    failures, row = decoding_check(lm, vector(lm))
    assert failures == [] and row.status == "PASS", failures
    assert row.rel_drift <= VOCAB_LOGITS_REL_TOL and "match the model's forward pass" in row.detail


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])
def test_a_decoding_that_skips_the_final_norm_fails(zoo_model, alias, monkeypatch):
    lm = zoo_model(alias)
    from fvkit.models import adapters

    def without_norm(lm, fv):  # the mutation harness's norm_skipped_in_decoding
        head = adapters.resolve_lm_head(lm.model, lm.spec)
        with torch.no_grad():
            return head(fv.reshape(1, 1, -1).to(torch.float32)).reshape(-1).float()

    monkeypatch.setattr(vocab, "vector_logits", without_norm)
    failures, row = decoding_check(lm, vector(lm))
    assert row.status == "FAIL" and row.tolerance_name == "VOCAB_LOGITS_REL_TOL"
    (failure,) = failures
    assert "is not the model's own" in failure and "exceeds tolerance VOCAB_LOGITS_REL_TOL" in failure


def test_the_forward_pass_reads_the_vector_as_the_last_hidden_state(zoo_model):
    """Two different vectors give two different forward logits: the vector reached the output."""
    lm = zoo_model("tiny-llama")
    assert not torch.allclose(forward_logits(lm, vector(lm, 0)), forward_logits(lm, vector(lm, 1)))
