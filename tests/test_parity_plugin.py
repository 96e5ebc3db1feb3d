"""The parity suite as a product: its pytest plugin, report, options and failure modes.

Synthetic gate modules (``fvkit_gate`` / ``fvkit_model`` marks, no models)
exercise the plugin's bookkeeping in-process and fast; the real gates run in a
subprocess (their module names would clash with an outer session's) for the
checks that need them: collection-time errors, usage errors, and the
demonstration that a model with one out-projection scaled by 1.001 fails M2,
M3 and M4 against the stored reference snapshots.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fvkit.models import zoo
from fvkit.models.spec import all_specs
from fvkit.report.page import HTML_NAME
from fvkit.parity.report import LOG_NAME, REPORT_NAME, RUNS_DIR, STAGES_NAME

from synthetic_suite import REAL_CACHE, SYNTH_CONFTEST, SYNTH_DIR

REPO = Path(__file__).resolve().parents[1]
QUICK = ("--max-trials", "1", "--n-top-heads", "5", "--edit-layer", "1")

SYNTH_GATE = '''
import os
import pytest

pytestmark = pytest.mark.fvkit_gate("{gate}")
MODELS = [pytest.param(m, id=m, marks=pytest.mark.fvkit_model(m)) for m in ("alpha", "beta")]

@pytest.mark.parametrize("model", MODELS)
def test_{name}(model, request):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    request.node.user_properties.append(("fvkit_result", {{
        "metrics": {{"drift": 0.5}},
        "stage_rows": [{{"stage": "{name}", "status": "PASS", "detail": worker}}],
        "timings": {{"{name}": 0.01}}}}))
    if f"{{model}}:{gate}" in os.environ.get("SYNTH_FAIL", "").split(","):
        pytest.fail(f"{name}: synthetic drift 1e-3 exceeds tolerance 1e-5", pytrace=False)
    if f"{{model}}:{gate}" == os.environ.get("SYNTH_INTERRUPT"):
        raise KeyboardInterrupt
'''
SYNTH_NAMES = {"M1": "prompts", "M2": "mean_activations", "M3": "indirect_effect", "M4": "function_vector",
               "M5": "spec_resolution"}


@pytest.fixture
def synth(pytester, monkeypatch):
    """A directory with one synthetic gate module per gate, two models each."""
    monkeypatch.setenv("FVKIT_CACHE", REAL_CACHE)
    pytester.makeconftest(SYNTH_CONFTEST)
    for i, (gate, name) in enumerate(SYNTH_NAMES.items(), start=1):
        pytester.makepyfile(**{f"test_gate_m{i}": SYNTH_GATE.format(gate=gate, name=name)})
    return pytester


def read_report(root: Path) -> dict:
    return json.loads((root / SYNTH_DIR / REPORT_NAME).read_text())


def statuses(report: dict) -> dict:
    return {(m, g): v for m, gates in report["summary"].items() for g, v in gates.items()}


# --- options ---------------------------------------------------------------------------
def test_options_have_their_own_group_and_ini_names(pytester):
    result = pytester.runpytest("-p", "fvkit.parity.switch", "--help")
    out = result.stdout.str()
    assert "fvkit parity" in out
    for flag in ("--model=NAME", "--model-spec", "--dataset", "--data-dir", "--fixed-trials", "--max-trials",
                 "--n-top-heads", "--edit-layer", "--seed", "--fail-fast", "--reference-src", "--baukit",
                 "--device", "--dtype", "--quant"):
        assert flag in out, flag
    assert "fvkit_model (linelist)" in out and "fvkit_edit_layer (string)" in out


@pytest.mark.parametrize("args, refused", [
    (("--dtype", "fp16"), "--dtype fp16"),
    (("--device", "cuda"), "--device cuda"),
    (("--quant", "8bit"), "--quant 8bit"),
])
def test_non_parity_numeric_modes_are_a_usage_error(synth, args, refused):
    result = synth.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert f"refuses {refused}" in err and "cpu/fp32/quant none" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (("--edit-layer", "middle"), "--edit-layer must be a whole number or 'all', got 'middle'"),
    (("--ie-mode", "quick"), "--ie-mode must be one of both, exact, fast, got 'quick'"),
])
def test_bad_edit_layer_or_ie_mode_is_a_usage_error(synth, args, message):
    result = synth.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str() and "Traceback" not in result.stderr.str()


def test_ini_value_is_used_and_command_line_wins(synth):
    synth.makeini("[pytest]\nfvkit_dtype = fp16\n")
    assert synth.runpytest().ret == pytest.ExitCode.USAGE_ERROR
    assert synth.runpytest("--dtype", "fp32").ret == pytest.ExitCode.OK


def test_snapshot_update_without_live_reference_is_a_usage_error(synth):
    result = synth.runpytest("--snapshot-update")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "needs a live reference" in result.stderr.str()


# --- report ----------------------------------------------------------------------------
def test_report_files_are_written_per_model_and_gate(synth):
    result = synth.runpytest()
    result.assert_outcomes(passed=10)
    root = synth.path
    report = read_report(root)
    assert report["complete"] is True and report["exit_status"] == 0
    assert set(report["models"]) == {"alpha", "beta"}
    assert set(statuses(report).values()) == {"PASS"} and len(statuses(report)) == 10
    gate = report["models"]["alpha"]["gates"]["M2"]
    assert gate["tests"][0]["metrics"] == {"drift": 0.5} and gate["seconds"] >= 0
    assert report["models"]["alpha"]["stage_timings"]["mean_activations"] == 0.01
    assert "transformers" in report["environment"] and "MEAN_ACT_REL_TOL" in report["tolerances"]
    csv_lines = (root / SYNTH_DIR / STAGES_NAME).read_text().splitlines()
    assert csv_lines[0].startswith("model,gate,stage") and len(csv_lines) == 11
    log = (root / SYNTH_DIR / LOG_NAME).read_text()
    assert "PASS  alpha M1 test_prompts" in log and "complete=true" in log
    out = result.stdout.str()
    assert "fvkit parity: synthds / fixed_trials_synthds_t2_s2_seed0" in out
    assert any(line.split()[:6] == ["alpha", "PASS", "PASS", "PASS", "PASS", "PASS"] for line in out.splitlines())
    assert str(root / SYNTH_DIR / REPORT_NAME) in out
    page = (root / SYNTH_DIR / HTML_NAME).read_text()
    assert str(root / SYNTH_DIR / HTML_NAME) in out and ">complete<" in page and "alpha" in page


def test_failure_cause_is_in_the_report(synth, monkeypatch):
    monkeypatch.setenv("SYNTH_FAIL", "beta:M3")
    synth.runpytest().assert_outcomes(passed=9, failed=1)
    report = read_report(synth.path)
    gate = report["models"]["beta"]["gates"]["M3"]
    assert gate["status"] == "FAIL" and "exceeds tolerance 1e-5" in gate["cause"]
    assert report["complete"] is True


def test_interrupted_run_leaves_report_marked_incomplete(synth, monkeypatch):
    monkeypatch.setenv("SYNTH_INTERRUPT", "alpha:M3")
    result = synth.runpytest(no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    # No complete run yet: the top level stays empty; the session's own copy says how far it got.
    assert not (synth.path / SYNTH_DIR / REPORT_NAME).exists()
    (run,) = (synth.path / SYNTH_DIR / RUNS_DIR).iterdir()
    report = json.loads((run / REPORT_NAME).read_text())
    assert report["complete"] is False
    assert statuses(report)[("alpha", "M1")] == "PASS" and ("beta", "M1") not in statuses(report)
    assert "complete=false" in (run / LOG_NAME).read_text()
    out = result.stdout.str()
    assert "written: (report marked incomplete)" in out and str(run / REPORT_NAME) in out
    assert f"top level {synth.path / SYNTH_DIR} unchanged: this run is incomplete" in out
    assert "it has no complete report yet" in out


def test_every_run_keeps_its_own_report(synth, monkeypatch):
    monkeypatch.setenv("SYNTH_FAIL", "beta:M3,alpha:M5")
    synth.runpytest().assert_outcomes(passed=8, failed=2)
    first = read_report(synth.path)
    top = synth.path / SYNTH_DIR
    before = {name: (top / name).read_bytes() for name in (REPORT_NAME, STAGES_NAME, LOG_NAME, HTML_NAME)}
    monkeypatch.setenv("SYNTH_FAIL", "")
    monkeypatch.setenv("SYNTH_INTERRUPT", "alpha:M2")
    result = synth.runpytest(no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    runs = sorted((top / RUNS_DIR).iterdir())
    assert len(runs) == 2
    reports = [json.loads((run / REPORT_NAME).read_text()) for run in runs]
    # Each run's report is kept whole in its own folder; the top level still holds the
    # latest complete run, byte for byte.
    assert reports[0]["complete"] is True and statuses(reports[0]) == statuses(first)
    assert reports[1]["complete"] is False and first["complete"] is True
    assert {name: (top / name).read_bytes() for name in before} == before
    assert "unchanged: this run is incomplete" in result.stdout.str()
    assert "keeps the previous complete report" in result.stdout.str()
    log = (runs[0] / LOG_NAME).read_text()
    # The whole cause, on the indented lines under the test's line.
    assert "FAIL  beta M3" in log and "\n    indirect_effect: synthetic drift 1e-3 exceeds tolerance 1e-5" in log


def test_no_report_without_gate_tests(pytester):
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    pytester.runpytest("-p", "fvkit.parity.switch").assert_outcomes(passed=1)
    assert not (pytester.path / "results_fv").exists()


# --- --fail-fast -----------------------------------------------------------------------
def test_fail_fast_skips_the_models_later_gates(synth, monkeypatch):
    monkeypatch.setenv("SYNTH_FAIL", "alpha:M2")
    result = synth.runpytest("--fail-fast", "-rs")
    result.assert_outcomes(passed=6, failed=1, skipped=3)
    result.stdout.fnmatch_lines(["*--fail-fast: alpha failed gate M2 (mean_activations, test_mean_activations)*"])
    got = statuses(read_report(synth.path))
    assert got[("alpha", "M1")] == "PASS" and got[("alpha", "M2")] == "FAIL"
    assert [got[("alpha", g)] for g in ("M3", "M4", "M5")] == ["SKIP"] * 3
    assert [got[("beta", g)] for g in ("M1", "M2", "M3", "M4", "M5")] == ["PASS"] * 5


def test_without_fail_fast_every_gate_runs(synth, monkeypatch):
    monkeypatch.setenv("SYNTH_FAIL", "alpha:M2")
    synth.runpytest().assert_outcomes(passed=9, failed=1)


def test_gates_run_model_by_model_in_gate_order(synth):
    result = synth.runpytest("--collect-only", "-q")
    ids = [line for line in result.stdout.lines if "::" in line]
    models = [line.split("[")[1].rstrip("]").split("]")[0] for line in ids]
    assert models == ["alpha"] * 5 + ["beta"] * 5
    assert [line.split("::")[0] for line in ids[:5]] == [f"test_gate_m{i}.py" for i in range(1, 6)]


# --- xdist -----------------------------------------------------------------------------
def test_xdist_controller_writes_one_report_and_models_stay_on_one_worker(synth, monkeypatch):
    pytest.importorskip("xdist")
    monkeypatch.setenv("SYNTH_FAIL", "beta:M1")
    result = synth.runpytest_subprocess("-n", "2", "--fail-fast")
    result.assert_outcomes(passed=5, failed=1, skipped=4)
    report = read_report(synth.path)
    assert report["complete"] is True and set(report["models"]) == {"alpha", "beta"}
    rows = (synth.path / SYNTH_DIR / STAGES_NAME).read_text().splitlines()[1:]
    by_model = {}
    for row in rows:
        fields = row.split(",")
        if fields[5] == "PASS":
            by_model.setdefault(fields[0], set()).add(fields[-1])
    assert all(len(workers) == 1 for workers in by_model.values()), by_model
    assert not list(synth.path.glob(f"{SYNTH_DIR}/.*.tmp"))


# --- the real gates (subprocess) -------------------------------------------------------
@pytest.fixture
def suite(pytester, monkeypatch):
    """A copy of parity_tests/ (gates, conftest, reference runner, snapshots) in a scratch directory."""
    monkeypatch.setenv("FVKIT_CACHE", REAL_CACHE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(REPO / "parity_tests", pytester.path / "parity_tests",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pytest.ini", pytester.path / "pytest.ini")
    shutil.copy(REPO / "conftest.py", pytester.path / "conftest.py")
    return pytester


def run_suite(pytester, *args):
    return pytester.runpytest_subprocess("parity_tests", "--data-dir", str(REPO / "datasets"), "-p", "no:cacheprovider",
                                         *args, timeout=900)


def test_edit_layer_out_of_range_fails_at_collection_with_the_range(suite):
    result = run_suite(suite, "--model", "tiny-gpt2", "--edit-layer", "7")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    out = result.stdout.str()
    assert "error during collection" in out
    assert "--edit-layer 7 is out of range for tiny-gpt2: valid layers are 0..2" in out
    assert "Traceback" not in out


def test_too_many_top_heads_fails_at_collection(suite):
    result = run_suite(suite, "--model", "tiny-gpt2", "--n-top-heads", "99")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert "--n-top-heads 99 is more than the 9 heads of tiny-gpt2" in result.stdout.str()


def test_unknown_model_fails_only_its_own_gates(suite):
    """An unavailable model (``pytest --model gpt2`` offline) fails its own gates with one
    message naming the zoo's aliases; the other models' gates in the run still pass."""
    result = run_suite(suite, "--model", "./no/such/model", "--model", "tiny-gpt2", *QUICK, "-k", "test_prompts")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "cannot load model './no/such/model'" in out and "tiny-gpt2" in out
    assert "Traceback" not in out


def test_model_the_release_cannot_build_is_skipped_with_the_reason(suite):
    """gemma3-270m under a release without Gemma 3 (4.49.0, made to look installed by a plugin
    loaded first): its gates are skipped, naming model, release and fix; nothing is built, and
    the other models' gates of the run still pass."""
    suite.makepyfile(old_release="import fvkit.models.release as r\nr.installed_transformers = lambda: '4.49.0'\n")
    result = run_suite(suite, "-p", "old_release", "--model", "gemma3-270m", "--model", "tiny-gpt2", *QUICK,
                       "-k", "test_prompts or spec_resolution and gemma3")
    result.assert_outcomes(passed=1, skipped=2)
    out = result.stdout.str()
    assert out.count("model 'gemma3-270m' (spec 'gemma3') needs transformers >= 4.50, but this environment has "
                     "transformers 4.49.0") == 2
    assert "Traceback" not in out


def test_dash_k_selects_one_m5_test_per_registered_spec(suite):
    result = run_suite(suite, "--collect-only", "-q", "-k", "spec_resolution")
    ids = [line for line in result.stdout.lines if "test_spec_resolution[" in line]
    # Each spec on its default parity models (tiny-gemma and tiny-gemma-hd for gemma), else on one zoo model.
    expected = [s.name for s in all_specs() for _ in range(
        max(1, sum(zoo.ZOO[a].spec == s.name for a in zoo.DEFAULT_PARITY_MODELS)))]
    assert sorted(i.split("[")[1].split(":")[0] for i in ids) == sorted(expected)


def test_model_spec_contradicting_the_bos_policy_fails_m5(suite):
    """tiny-qwen2's tokenizer adds no BOS; under --model-spec llama (which says it does) the
    prompts would lose their BOS and the first prompt token be labelled as one: M5 fails."""
    result = run_suite(suite, "--model", "tiny-qwen2", "--model-spec", "llama", *QUICK,
                       "-k", "spec_resolution and tiny-qwen2")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "ModelSpec 'llama' says prepend_bos=True, but this tokenizer does not add a BOS token by itself " \
           "(model 'tiny-qwen2')" in out


def perturbed_copy(directory: Path) -> Path:
    """tiny-gpt2 exported as a local checkpoint, with layer 0's out-projection scaled by 1.001."""
    from safetensors.torch import load_file, save_file

    target = zoo.export_model("tiny-gpt2", str(directory / "tiny-gpt2"))
    weights = Path(target) / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["transformer.h.0.attn.c_proj.weight"] = tensors["transformer.h.0.attn.c_proj.weight"] * 1.001
    save_file(tensors, str(weights), metadata={"format": "pt"})
    # The copy no longer matches the zoo's recorded weight hash; it is a different model now.
    meta_path = Path(target) / zoo.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta.pop("weights_sha256", None)
    meta_path.write_text(json.dumps(meta))
    return Path(target)


@pytest.mark.slow
def test_perturbed_out_projection_fails_m2_m3_m4(suite, tmp_path):
    """The stored reference numbers of tiny-gpt2 catch a 0.1% change of one weight matrix,
    the layer sweep included (``--edit-layer all`` keeps the quick settings' layer 1)."""
    model = perturbed_copy(tmp_path)
    result = run_suite(suite, "--model", str(model), *QUICK[:4], "--edit-layer", "all", "--ie-mode", "both",
                       "-k", "not spec_resolution", "-rf")
    out = result.stdout.str()
    result.assert_outcomes(passed=1, failed=5)
    for stage, tol in (("mean_activations", "MEAN_ACT_REL_TOL=1e-05"), ("function_vector", "FV_REL_TOL=1e-05")):
        assert f"{stage} vs snapshot: drift" in out and f"exceeds tolerance {tol}" in out, stage
    # tiny-gpt2's effects lie below float32's resolution of probabilities: the absolute floor decides.
    assert "indirect_effect vs snapshot: noise level" in out and "exceeds IE_ABS_FLOOR=" in out
    for gate in ("M2 mean_activations", "M3 indirect_effect [exact]", "M3 indirect_effect [fast]",
                 "M4 function_vector", "M4 function_vector [layer sweep]"):
        assert f"{gate} for tiny-gpt2" in out and "FAILED" in out
    report = json.loads(next(suite.path.glob(f"results_fv/present-past/*/{REPORT_NAME}")).read_text())
    assert report["summary"]["tiny-gpt2"] == {"M1": "PASS", "M2": "FAIL", "M3": "FAIL", "M4": "FAIL"}
    drift = report["models"]["tiny-gpt2"]["gates"]["M2"]["tests"][0]["metrics"]["M2"]["snapshot"]["drifts"][0]
    assert drift["rel_drift"] > drift["tolerance"] and drift["worst_index"]
    assert "layer_sweep.zero_shot vs snapshot: layer_sweep.zero_shot[layer 0]" in out
    # Four gates, one model load, one pipeline run.
    assert report["models"]["tiny-gpt2"]["settings"]["model_loads_this_process"] == 1


@pytest.mark.slow
def test_layer_sweep_is_checked_against_the_reference_and_shown_on_the_page(suite):
    """--edit-layer all: M4 also compares every layer's rank lists with the stored
    reference sweep, and the page carries the sweep figure beside the heatmap."""
    result = run_suite(suite, "--model", "tiny-qwen2", *QUICK[:4], "--edit-layer", "all", "-k", "function_vector")
    result.assert_outcomes(passed=2)
    out_dir = next(suite.path.glob("results_fv/present-past/*/"))
    report = json.loads((out_dir / REPORT_NAME).read_text())
    tests = {t["test"]: t for t in report["models"]["tiny-qwen2"]["gates"]["M4"]["tests"]}
    sweep = tests["test_layer_sweep"]
    assert sweep["status"] == "PASS" and sweep["metrics"]["M4[layer sweep]"]["snapshot"]["ok"] is True
    assert sweep["metrics"]["layer_sweep"]["method"] == "cached"
    assert report["models"]["tiny-qwen2"]["settings"]["layer_sweep"] is True
    page = (out_dir / HTML_NAME).read_text()
    assert page.count("data:image/png;base64,") == 2 and "layer sweep of tiny-qwen2" in page


@pytest.mark.slow
def test_each_model_is_loaded_once_per_session(suite):
    """Every gate of two models plus M5 on every registered spec: the loader runs once per model."""
    result = run_suite(suite, "--model", "tiny-llama", "--model", "tiny-gpt2", *QUICK)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-3000:]
    report = json.loads(next(suite.path.glob(f"results_fv/present-past/*/{REPORT_NAME}")).read_text())
    for model in ("tiny-llama", "tiny-gpt2"):
        settings = report["models"][model]["settings"]
        assert settings["model_loads_this_process"] == 1, (model, settings)
        # Loader calls counted inside fvkit.models.loader equal the session's distinct models.
        assert settings["loader_calls_this_process"] == settings["models_loaded_by_session"], (model, settings)
    assert len(report["summary"]["tiny-llama"]) == 5 and len(report["summary"]) >= 9
