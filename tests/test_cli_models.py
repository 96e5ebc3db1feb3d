"""`fvkit specs`, `fvkit resolve`, `fvkit export-model`."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from fvkit import cli
from fvkit.cli.models import check_bos_policy, check_hooks
from fvkit.errors import SpecError
from fvkit.models.loader import load_model
from fvkit.models.spec import all_specs, get_spec
from fvkit.models.zoo import TINY_PARITY_MODELS, EXPECTED_WEIGHTS_SHA256

TINY = list(dict.fromkeys(list(TINY_PARITY_MODELS) + ["tiny-gemma-hd"]))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_specs_lists_every_spec(capsys):
    code, out, _ = run(capsys, "specs")
    assert code == 0
    lines = out.splitlines()
    for spec in all_specs():
        row = next(line for line in lines if line.split()[0] == spec.name)
        assert spec.blocks_path in row and spec.out_proj_path_in_attn in row
        assert ("tokenizer adds" if spec.prepend_bos else repr(spec.bos_text)) in row
        for arch in spec.architectures:
            assert arch in row


@pytest.mark.parametrize("alias", TINY)
def test_resolve_every_tiny_model(capsys, zoo_model, alias):
    code, out, err = run(capsys, "resolve", "--model", alias)
    assert code == 0, err
    lm = zoo_model(alias)
    assert f"OK: {lm.dims.n_layers} blocks" in out
    assert f"{lm.dims.n_layers * 2} hooks fired" in out
    assert EXPECTED_WEIGHTS_SHA256[alias] in out
    for name in lm.out_proj_names():
        assert name in out


@pytest.mark.smollm2
def test_resolve_smollm2(capsys, smollm2_available):
    code, out, err = run(capsys, "resolve", "--model", "smollm2-135m")
    assert code == 0, err
    assert "OK: 30 blocks" in out and "tokenizer adds BOS: no" in out


def test_resolve_wrong_spec(capsys):
    code, out, err = run(capsys, "resolve", "--model", "tiny-llama", "--model-spec", "gpt2")
    assert code == 2 and out == ""
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "fvkit resolve: error: ModelSpec 'gpt2': blocks_path='transformer.h'")


def test_resolve_parity_refusal(capsys):
    code, _, err = run(capsys, "resolve", "--model", "tiny-llama", "--dtype", "fp16")
    assert code == 2 and "parity mode needs dtype=fp32, got dtype=fp16" in err


def test_resolve_unknown_model(capsys):
    code, _, err = run(capsys, "resolve", "--model", "tiny-bert")
    assert code == 2 and "cannot load model 'tiny-bert'" in err and "tiny-gpt2" in err


def test_hook_that_never_fires_is_reported():
    lm = load_model("tiny-llama")  # a private copy: the test adds modules to it
    for layer in lm.model.model.layers:
        layer.self_attn.add_module("unused", torch.nn.Linear(40, 40))
    spec = dataclasses.replace(get_spec("llama"), out_proj_path_in_attn="unused")
    with pytest.raises(SpecError, match=r"hooks on model.layers.0.self_attn.unused, .* never fired"):
        check_hooks(dataclasses.replace(lm, spec=spec))


def test_out_projection_input_width_is_checked(zoo_model):
    lm = zoo_model("tiny-gemma-hd")
    spec = dataclasses.replace(lm.spec, out_proj_path_in_attn="q_proj")
    with pytest.raises(SpecError, match=r"q_proj received inputs of width 40, not n_heads\*head_dim = 48"):
        check_hooks(dataclasses.replace(lm, spec=spec))


def test_bos_policy_mismatch_is_reported(zoo_model):
    lm = zoo_model("tiny-gpt2")
    wrong = dataclasses.replace(lm.spec, prepend_bos=True)
    with pytest.raises(SpecError, match="prepend_bos=True, but this tokenizer does not add a BOS"):
        check_bos_policy(dataclasses.replace(lm, spec=wrong))
    multi = dataclasses.replace(lm.spec, bos_text="<s>")
    with pytest.raises(SpecError, match=r"bos_text='<s>' is 3 tokens"):
        check_bos_policy(dataclasses.replace(lm, spec=multi))


def test_export_model(capsys, tmp_path):
    target = tmp_path / "tiny-qwen2"
    code, out, _ = run(capsys, "export-model", "tiny-qwen2", str(target))
    assert code == 0 and str(target) in out
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    code, _, err = run(capsys, "export-model", "tiny-qwen2", str(target))
    assert code == 2 and "already exists and is not an empty directory" in err
    code, _, err = run(capsys, "export-model", "tiny-bert", str(tmp_path / "x"))
    assert code == 2 and "'tiny-bert' is not a zoo model" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_command_line_entry_point(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    ok = subprocess.run([sys.executable, "-m", "fvkit.cli.main", "resolve", "--model", "tiny-neox"],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "OK: 3 blocks" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fvkit.cli.main", "resolve", "--model", "tiny-neox",
                          "--model-spec", "llama"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "blocks_path='model.layers'" in bad.stderr
