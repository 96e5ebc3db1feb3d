"""The commands of the spec, the design card and the README, run as written, with their exit codes.

Each runs in a subprocess from the checkout's root, the way a new user types it
(``fvkit`` is ``python -m fvkit.cli``, the console script's target).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fvkit.models import zoo

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TRIALS = REPO / "datasets" / "fixed_trials" / "fixed_trials_antonym_t10_s10_seed0.json"
#: The longest command here (the old script's full parity line) takes about a minute on two cores.
COMMAND_TIMEOUT_S = 900
#: reST markup that a terminal would show literally.
REST_MARKUP = re.compile(r"``|:(class|func|mod|meth|attr):`")


def run(command: str, cwd: Path = REPO, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    if argv[0] == "fvkit":
        argv = [sys.executable, "-m", "fvkit.cli", *argv[1:]]
    elif argv[0] in ("python", "pytest"):
        argv = [sys.executable, *(["-m", "pytest"] if argv[0] == "pytest" else []), *argv[1:]]
    env = dict(os.environ, FVKIT_CACHE=zoo.cache_root(), HF_HUB_OFFLINE="1", FVKIT_PROGRESS="0",
               PYTHONPATH=str(REPO), **(extra_env or {}))
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- item 1: the old script's command lines -------------------------------------------------
OLD_PARITY = ("fvkit parity --model_name tiny-llama --model_spec llama --dataset_name antonym "
              "--fixed_trials_path datasets/fixed_trials/fixed_trials_antonym_t10_s10_seed0.json "
              "--max_trials 1 --n_top_heads 5 --edit_layer 1 --seed 42 --fail_fast 1")


def test_old_parity_command_collects_its_gates():
    """The old line up to ``--fail_fast 1``, collection only: before the fix pytest got
    '1' as a path and exited 4 with nothing run."""
    proc = run(OLD_PARITY + " -- --collect-only -q -p no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = proc.stdout.splitlines()[0]     # the pytest command fvkit parity runs
    assert "--seed 42 --fail-fast --collect-only" in line and "--fail-fast 1" not in line
    assert "test_prompts[tiny-llama]" in proc.stdout


@pytest.mark.slow
def test_old_parity_command_runs_as_written():
    proc = run(OLD_PARITY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fvkit parity: antonym / fixed_trials_antonym_t10_s10_seed0" in proc.stdout


@pytest.mark.parametrize("spec, status", [("llama", 0), ("gpt2", 2)])
def test_old_smoke_script_runs_resolve(spec, status):
    proc = run(f"python scripts/smoke_resolve_spec_outproj.py --model tiny-llama --model_spec {spec} "
               f"--device cpu --dtype fp32 --quant none")
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-2000:]
    if status == 0:
        assert "OK: 3 blocks" in proc.stdout
    else:
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("fvkit resolve: error:")


def test_resolve_takes_model_spec_with_an_underscore():
    proc = run("fvkit resolve --model tiny-gpt2 --model_spec gpt2")
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- item 2: --model-spec stays with its --model ---------------------------------------------
def test_model_spec_applies_to_its_model_only(tmp_path):
    proc = run(f"pytest parity_tests --model tiny-llama --model-spec llama -k 'spec_resolution and (mistral or gpt2)' "
               f"-p no:cacheprovider --rootdir {REPO} -q", cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "2 passed" in proc.stdout and "resolved to spec" not in proc.stdout


# --- item 3: the card's `pytest --model gpt2` --------------------------------------------------
def test_unavailable_model_fails_its_gates_not_the_unit_tests():
    proc = run("pytest --model gpt2 tests/test_vocab.py parity_tests -k 'test_vocab or test_prompts' "
               "-p no:cacheprovider -q -rfE")
    out = proc.stdout
    if proc.returncode == 0:            # gpt2 is in this machine's hub cache: the card's example just works
        assert "passed" in out
        return
    assert proc.returncode == 1, out[-3000:] + proc.stderr[-3000:]
    assert "cannot load model 'gpt2'" in out and "tiny-llama" in out   # names the zoo's aliases
    assert re.search(r"\d+ passed", out) and "1 error" in out


# --- item 7: what a new user tripped over ---------------------------------------------------
@pytest.mark.parametrize("command", ["", "parity", "run", "trials", "resolve", "specs", "export-model"])
def test_help_is_plain_text_with_defaults(command):
    proc = run(f"fvkit {command} --help")
    assert proc.returncode == 0, proc.stderr
    assert not REST_MARKUP.search(proc.stdout), proc.stdout
    if command in ("trials", "run"):
        assert "(default: 10)" in proc.stdout or "default: 10" in proc.stdout
    if command == "resolve":
        assert "choices: fp32, fp16" in " ".join(proc.stdout.split())


def test_trials_without_out_never_replaces_a_shipped_file():
    before = sha256(SHIPPED_TRIALS)
    proc = run("fvkit trials --dataset antonym --test-size 0.25")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pass --out FILE" in proc.stderr and "Traceback" not in proc.stderr
    same = run("fvkit trials --dataset antonym")      # the very same trials: nothing changes either way
    assert same.returncode == 0, same.stderr
    assert sha256(SHIPPED_TRIALS) == before


def test_trials_with_out_writes_there(tmp_path):
    out = tmp_path / "t.json"
    proc = run(f"fvkit trials --dataset antonym --test-size 0.25 --out {out}")
    assert proc.returncode == 0 and out.is_file(), proc.stderr


@pytest.mark.slow
def test_run_default_top_heads_fit_the_model_and_the_summary_names_the_layer(tmp_path):
    proc = run("fvkit run --model tiny-gpt2", cwd=tmp_path)     # the command, as written
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "results_fv" / "present-past" / "fvkit_run" / "tiny-gpt2" / "run.json").is_file()
    assert "top heads (9):" in proc.stdout          # tiny-gpt2 has 3 x 3 heads, fewer than the default 10
    assert re.search(r"^layer 1: zero-shot top-1", proc.stdout, re.M)


def test_default_top_heads_are_capped_at_the_models_heads():
    from types import SimpleNamespace

    from fvkit.cli.pipeline import DEFAULT_N_TOP_HEADS, fitted_top_heads

    tiny = SimpleNamespace(dims=SimpleNamespace(n_layers=3, n_heads=3))
    big = SimpleNamespace(dims=SimpleNamespace(n_layers=12, n_heads=12))
    assert fitted_top_heads(None, tiny) == 9
    assert fitted_top_heads(None, big) == DEFAULT_N_TOP_HEADS
    assert fitted_top_heads(20, tiny) == 20       # an explicit value is the pipeline's to check


def test_forced_spec_leaves_other_specs_to_their_own_zoo_models():
    """`pytest --model tiny-llama --model-spec olmo`: every other spec's M5 case still runs
    on its zoo model under its own spec; llama's zoo model is taken, so that case says so."""
    proc = run("pytest parity_tests --model tiny-llama --model-spec olmo -k spec_resolution --collect-only -q "
               "-p no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-3000:]
    ids = {line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "test_spec_resolution[" in line}
    assert {"olmo:tiny-llama", "llama:spec-llama", "mistral:tiny-mistral", "gpt2:tiny-gpt2"} <= ids
    assert "Unused snapshot detection is disabled" not in proc.stdout
