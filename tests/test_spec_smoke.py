"""Gate M5's smoke checks fail on an injection the model cancels and on a contradicted BOS policy.

The injection check once added an all-ones vector and accepted any change of
the logits: the next LayerNorm removes a constant vector, so gpt2, gptj, neox
and olmo passed on a change of 4e-6, float noise. A spec whose BOS policy
contradicted the tokenizer passed M5 and ran through ``fvkit run``.
"""

import dataclasses

import pytest
import torch

from fvkit import cli
from fvkit.models.loader import load_model
from fvkit.parity import spec_smoke
from fvkit.parity.spec_smoke import (MIN_INJECTION_LOGIT_CHANGE, SmokeFailure, bos_policy_smoke,
                                     forward_hook_smoke, injection_vector)


def test_injection_vector_is_a_fixed_direction_at_the_given_norm():
    first, again = injection_vector(64, 12.5), injection_vector(64, 12.5)
    assert torch.equal(first, again)
    assert float(first.norm()) == pytest.approx(12.5, rel=1e-6)
    # Almost all of its length lies off the all-ones axis a LayerNorm removes.
    along_mean = abs(float(first.mean())) * 64 ** 0.5
    assert along_mean < 0.5 * 12.5


@pytest.mark.parametrize("alias", ["tiny-gpt2", "tiny-llama"])
def test_injection_moves_the_logits_past_the_minimum(zoo_model, alias):
    smoke = forward_hook_smoke(zoo_model(alias))
    assert smoke["injection_logit_change"] >= MIN_INJECTION_LOGIT_CHANGE
    assert smoke["injection_norm"] > 0


def test_injection_cancelled_by_layernorm_fails(zoo_model, monkeypatch):
    # The old check's all-ones vector: gpt2's next LayerNorm removes it entirely.
    monkeypatch.setattr(spec_smoke, "injection_vector", lambda size, norm: torch.ones(size))
    with pytest.raises(SmokeFailure, match=r"transformer\.h\.1 moved the last logits by .*below the minimum 1"):
        forward_hook_smoke(zoo_model("tiny-gpt2"))


def test_injection_whose_edit_is_undone_fails(monkeypatch):
    # A private copy in which the block after the edited one always reads the residual
    # stream of the first (clean) pass: the injection hook fires, yet its edit never
    # reaches the logits, as with a spec pointing at a module the model overwrites.
    lm = load_model("tiny-gpt2")
    first_pass = {}

    def clean_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        first_pass.setdefault("hidden", hidden.detach().clone())
        if args:
            return (first_pass["hidden"],) + tuple(args[1:]), kwargs
        return args, dict(kwargs, hidden_states=first_pass["hidden"])

    lm.model.transformer.h[1].register_forward_pre_hook(clean_input, with_kwargs=True)
    monkeypatch.setattr(spec_smoke, "default_edit_layer", lambda n_layers: 0)
    with pytest.raises(SmokeFailure, match=r"transformer\.h\.0 moved the last logits by 0, below the minimum"):
        forward_hook_smoke(lm)


def test_bos_policy_contradiction_fails_m5():
    lm = load_model("tiny-qwen2", model_spec="llama")
    with pytest.raises(SmokeFailure, match=r"ModelSpec 'llama' says prepend_bos=True, but this tokenizer does not "
                                           r"add a BOS token by itself \(model 'tiny-qwen2'\)"):
        bos_policy_smoke(lm)


def test_bos_policy_that_fits_passes(zoo_model):
    assert bos_policy_smoke(zoo_model("tiny-qwen2")) == {"prepend_bos": False, "bos_text": "<|endoftext|>"}


def test_run_refuses_a_spec_that_contradicts_the_bos_policy(capsys, tmp_path):
    out = tmp_path / "run"
    code = cli.main(["run", "--model", "tiny-qwen2", "--model-spec", "llama", "--max-trials", "1",
                     "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert code == 2 and stdout == ""
    assert len(lines) == 1 and "Traceback" not in stderr
    line = lines[0]
    assert line.startswith("fvkit run: error: ModelSpec 'llama'")
    assert "model 'tiny-qwen2'" in line and "prepend_bos=False" in line and "leave out --model-spec" in line
    assert not any(out.glob("*.json"))
