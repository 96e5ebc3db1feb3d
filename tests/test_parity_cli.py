"""``fvkit parity`` (fvkit.cli.parity): the old script's flags become one pytest session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fvkit.models import zoo
from fvkit.cli.main import build_parser
from fvkit.errors import FvkitError
from fvkit.cli.parity import REPO_ROOT, pytest_arguments

TRIALS_ID = "fixed_trials_antonym_t10_s10_seed0"


def args(*argv):
    return build_parser().parse_args(["parity", *argv])


def test_script_flags_translate_to_plugin_options():
    out = pytest_arguments(args("--model_name", "tiny-llama,tiny-gpt2", "--dataset_name", "antonym",
                                "--fixed_trials_id", TRIALS_ID, "--max_trials", "1", "--n_top_heads", "5",
                                "--edit_layer", "1", "--seed", "42", "--fail_fast", "--", "-n", "2"))
    assert out[0] == str(REPO_ROOT / "parity_tests")
    assert out[1:5] == ["--model", "tiny-llama", "--model", "tiny-gpt2"]
    text = " ".join(out)
    for part in ("--dataset antonym", f"--fixed-trials {REPO_ROOT / 'datasets' / 'fixed_trials' / TRIALS_ID}.json",
                 "--max-trials 1", "--n-top-heads 5", "--edit-layer 1", "--seed 42", "--fail-fast"):
        assert part in text
    assert out[-2:] == ["-n", "2"]


@pytest.mark.parametrize("value", ["all", "-1"])
def test_edit_layer_all_or_minus_one_asks_for_the_sweep(value):
    out = " ".join(pytest_arguments(args("--edit_layer", value, "--ie_mode", "fast")))
    assert "--edit-layer all" in out and "--ie-mode fast" in out


def test_edit_layer_must_be_a_number_or_all(capsys):
    with pytest.raises(SystemExit):
        args("--edit_layer", "middle")
    assert "expected a layer number, 'all' or -1, got 'middle'" in capsys.readouterr().err


def test_trials_id_and_path_must_agree(tmp_path):
    other = tmp_path / "t.json"
    other.write_text(json.dumps({"id": "fixed_trials_antonym_t10_s10_seed7"}))
    with pytest.raises(FvkitError, match="holds trials 'fixed_trials_antonym_t10_s10_seed7', not --fixed_trials_id"):
        pytest_arguments(args("--fixed_trials_path", str(other), "--fixed_trials_id", TRIALS_ID))
    with pytest.raises(FvkitError, match="no file"):
        pytest_arguments(args("--fixed_trials_id", "fixed_trials_antonym_t3_s3_seed0"))


def test_fvkit_parity_runs_the_pytest_session_and_returns_its_status(tmp_path):
    env = dict(os.environ, FVKIT_CACHE=zoo.cache_root(), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "fvkit.cli.main", "parity", "--model_name", "tiny-gpt2",
                           "--edit_layer", "9", "--", "-p", "no:cacheprovider", "--rootdir", str(REPO_ROOT)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == int(pytest.ExitCode.INTERRUPTED), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "--edit-layer 9 is out of range for tiny-gpt2: valid layers are 0..2" in proc.stdout
    assert proc.stdout.startswith("pytest " + str(Path(REPO_ROOT) / "parity_tests"))


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), ("true", True), ("off", False)])
def test_fail_fast_takes_a_value_like_the_old_script(value, on):
    out = pytest_arguments(args("--model_name", "tiny-gpt2", "--fail_fast", value, "--seed", "42"))
    assert ("--fail-fast" in out) is on
    assert value not in out   # never handed to pytest as a path


def test_fail_fast_alone_still_means_on_and_a_bad_value_is_refused(capsys):
    assert "--fail-fast" in pytest_arguments(args("--fail_fast", "--", "-q"))
    with pytest.raises(SystemExit):
        args("--fail_fast", "2")
    assert "expected 0 or 1, got '2'" in capsys.readouterr().err
