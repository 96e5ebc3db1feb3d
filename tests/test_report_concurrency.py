"""Parity sessions sharing one report folder never lose each other's results.

    results_fv/<dataset>/<trials id>/   written under a lock from every session's staged data, once all are complete

In-process checks drive two report states by hand; the end-to-end check runs
two real pytest sessions at once on synthetic gates, and a session stopped by a
bad option, and compares the files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fvkit.parity.report import LOG_NAME, REPORT_NAME, RUNS_DIR, STAGES_NAME, GateOutcome, ReportState
from fvkit.parity.report_folder import SESSIONS_DIR
from fvkit.report.page import HTML_NAME

REPO = Path(__file__).resolve().parents[1]
DATASET, TRIALS_ID = "synthds", "fixed_trials_synthds_t2_s2_seed0"
FOLDER = f"results_fv/{DATASET}/{TRIALS_ID}"
FILES = (REPORT_NAME, STAGES_NAME, HTML_NAME, LOG_NAME)


def state_for(root: Path, models) -> ReportState:
    state = ReportState(root, environment={"python": "test"})
    state.bind(DATASET, TRIALS_ID, {"models": list(models)})
    return state


def outcome(model: str, gate: str) -> GateOutcome:
    return GateOutcome(f"test_{gate}.py::t[{model}]", model, gate, f"test_{gate}", status="PASS",
                       stage_rows=[{"stage": gate, "status": "PASS"}])


def test_two_interleaved_sessions_keep_both_results(tmp_path):
    a, b = state_for(tmp_path, ["alpha"]), state_for(tmp_path, ["beta"])
    for gate in ("M1", "M2"):
        a.record(outcome("alpha", gate))
        b.record(outcome("beta", gate))
    a.finish(0, interrupted=False)
    # beta's session is still running: the merged report is not complete, so no top level yet.
    assert not (tmp_path / FOLDER / REPORT_NAME).exists()
    assert "still running or was interrupted" in a.top_level_kept
    b.finish(0, interrupted=False)
    assert b.top_level_kept is None and (tmp_path / FOLDER / REPORT_NAME) in b.paths_written
    report = json.loads((tmp_path / FOLDER / REPORT_NAME).read_text())
    assert set(report["models"]) == {"alpha", "beta"} and report["complete"] is True
    assert report["summary"] == {"alpha": {"M1": "PASS", "M2": "PASS"}, "beta": {"M1": "PASS", "M2": "PASS"}}
    rows = (tmp_path / FOLDER / STAGES_NAME).read_text().splitlines()[1:]
    assert sorted(r.split(",")[0] for r in rows) == ["alpha", "alpha", "beta", "beta"]
    log = (tmp_path / FOLDER / LOG_NAME).read_text()
    assert log.count("session finished") == 2 and "alpha M2" in log and "beta M2" in log


def test_a_new_session_alone_starts_a_fresh_report(tmp_path):
    old = state_for(tmp_path, ["alpha"])
    old.record(outcome("alpha", "M1"))
    old.finish(0, interrupted=False)
    # The earlier session's process is gone: its staging folder now names a dead pid.
    staged = next((tmp_path / FOLDER / SESSIONS_DIR).iterdir())
    staged.rename(staged.with_name(f"999999999-{staged.name.split('-', 1)[1]}"))
    new = state_for(tmp_path, ["beta"])
    new.record(outcome("beta", "M1"))
    new.finish(0, interrupted=False)
    report = json.loads((tmp_path / FOLDER / REPORT_NAME).read_text())
    assert set(report["models"]) == {"beta"}
    assert "alpha" not in (tmp_path / FOLDER / LOG_NAME).read_text()


def test_a_session_that_records_nothing_writes_nothing(tmp_path):
    good = state_for(tmp_path, ["alpha"])
    good.record(outcome("alpha", "M1"))
    good.finish(0, interrupted=False)
    before = {n: (tmp_path / FOLDER / n).read_bytes() for n in FILES}
    failed = state_for(tmp_path, ["alpha"])
    failed.finish(4, interrupted=False)
    assert {n: (tmp_path / FOLDER / n).read_bytes() for n in FILES} == before


def test_an_incomplete_session_leaves_the_complete_top_level_byte_identical(tmp_path):
    done = state_for(tmp_path, ["alpha"])
    done.record(outcome("alpha", "M1"))
    done.finish(0, interrupted=False)
    before = {n: (tmp_path / FOLDER / n).read_bytes() for n in FILES}
    for interrupted in (True, False):   # stopped by Ctrl-C, or ended with a gate never reported
        cut = state_for(tmp_path, ["alpha", "beta"])
        cut.expected = {"test_M2.py::t[beta]"}
        cut.record(outcome("alpha", "M2"))
        assert {n: (tmp_path / FOLDER / n).read_bytes() for n in FILES} == before   # while it runs
        cut.finish(2, interrupted=interrupted)
        assert {n: (tmp_path / FOLDER / n).read_bytes() for n in FILES} == before
        own = json.loads((cut.run_dir / REPORT_NAME).read_text())
        assert own["complete"] is False and set(own["models"]) == {"alpha"}
        assert set(cut.paths_written) == {cut.run_dir / n for n in FILES}
        assert "unchanged: this run is incomplete" in cut.top_level_kept
        assert "keeps the previous complete report" in cut.top_level_kept


def test_ctrl_c_during_the_top_level_swap_waits_until_the_whole_set_is_in(tmp_path, monkeypatch):
    import signal

    from fvkit.parity import report_folder

    folder = report_folder.ReportFolder(tmp_path, report_folder.session_id())
    folder.replace({name: "old\n" for name in FILES})
    real_replace, calls = os.replace, []

    def replace_then_interrupt(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)   # arrives after the first of four renames

    monkeypatch.setattr(report_folder.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        folder.replace({name: "new\n" for name in FILES})
    assert len(calls) == 4 and {(tmp_path / n).read_text() for n in FILES} == {"new\n"}
    assert not list(tmp_path.glob(".*.tmp"))


CONFTEST = f'''
from fvkit.parity.plugin import report_state

pytest_plugins = ["fvkit.parity.switch"]

def pytest_configure(config):
    report_state(config).bind("{DATASET}", "{TRIALS_ID}", {{"origin": "synthetic"}})
'''
GATE = '''
import os, time
import pytest

pytestmark = pytest.mark.fvkit_gate("{gate}")
MODELS = [pytest.param(m, id=m, marks=pytest.mark.fvkit_model(m)) for m in ("alpha", "beta")]

@pytest.mark.parametrize("model", MODELS)
def test_{gate}(model, request):
    request.node.user_properties.append(("fvkit_result", {{"stage_rows": [{{"stage": "{gate}", "status": "PASS"}}]}}))
    time.sleep(float(os.environ.get("SYNTH_SLEEP", "0")))
'''


@pytest.mark.slow  # three pytest processes: about 35 s on two shared cores
def test_two_concurrent_pytest_sessions_and_a_bad_option(tmp_path):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for gate in ("M1", "M2", "M3", "M4"):
        (tmp_path / f"test_gate_{gate.lower()}.py").write_text(GATE.format(gate=gate))
    env = {**os.environ, "PYTHONPATH": str(REPO), "SYNTH_SLEEP": "0.5"}
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    runs = [subprocess.Popen(base + ["-k", model], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for model in ("alpha", "beta")]
    outs = [r.communicate(timeout=300)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    report = json.loads((tmp_path / FOLDER / REPORT_NAME).read_text())
    assert set(report["summary"]) == {"alpha", "beta"}, report["summary"]
    assert all(len(g) == 4 for g in report["summary"].values()) and report["complete"] is True
    own = [json.loads((run / REPORT_NAME).read_text()) for run in (tmp_path / FOLDER / RUNS_DIR).iterdir()]
    assert sorted(tuple(r["summary"]) for r in own) == [("alpha",), ("beta",)]  # each session's own copy
    before = {n: (tmp_path / FOLDER / n).read_bytes() for n in FILES}
    bad = subprocess.run(base + ["--edit-layer", "middle"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == pytest.ExitCode.USAGE_ERROR and "Traceback" not in bad.stderr
    assert {n: (tmp_path / FOLDER / n).read_bytes() for n in FILES} == before
