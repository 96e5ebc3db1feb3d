"""A gate's verdict against a stored snapshot is syrupy's own assertion (fvkit.parity.snapshots).

The extension's ``matches`` applies the gate's tolerances, so a perturbed value
fails through syrupy: the test's failure carries syrupy's diff, naming the worst
entry and the measured drift against the tolerance, while the report still gets
its per-stage rows from the gate runner.
"""

from __future__ import annotations

import csv
import json

import pytest

from fvkit.parity.report import REPORT_NAME, STAGES_NAME
from fvkit.parity.snapshots import FORMAT

from synthetic_suite import REAL_CACHE, SYNTH_CONFTEST, SYNTH_DIR

STORED = [[1.0, -2.0], [0.5, 0.25]]

GATE_MODULE = '''
import json
from types import SimpleNamespace

import pytest
from fvkit.parity.gate_runner import Gate, GateContext, Recorder

pytestmark = pytest.mark.fvkit_gate("M2")
MODELS = [pytest.param("alpha", id="alpha", marks=pytest.mark.fvkit_model("alpha"))]
VALUE = json.loads({value!r})

@pytest.mark.parametrize("model", MODELS)
def test_mean_activations(model, snapshot, request):
    settings = SimpleNamespace(key="k", as_dict=lambda: {{"key": "k"}})
    ctx = GateContext(model=model, settings=settings, live=None, snapshot=snapshot, update=False,
                      recorder=Recorder(request.node))
    gate = Gate("M2", ctx)
    gate.prepare()
    gate.check({{"mean_activations": VALUE}})
'''


def run_gate(pytester, monkeypatch, value):
    monkeypatch.setenv("FVKIT_CACHE", REAL_CACHE)
    pytester.makeconftest(SYNTH_CONFTEST)
    pytester.makepyfile(test_gate_m2=GATE_MODULE.format(value=json.dumps(value)))
    folder = pytester.path / "__snapshots__" / "test_gate_m2"
    folder.mkdir(parents=True)
    stored = {"format": FORMAT, "gate": "M2", "model": "alpha", "key": "k", "settings": {},
              "environment": {"transformers": "4.49.0"}, "value": {"mean_activations": STORED}}
    (folder / "test_mean_activations[alpha][k].json").write_text(json.dumps(stored))
    result = pytester.runpytest("-p", "no:cacheprovider")
    rows = list(csv.DictReader((pytester.path / SYNTH_DIR / STAGES_NAME).open()))
    report = json.loads((pytester.path / SYNTH_DIR / REPORT_NAME).read_text())
    return result, rows, report


def test_a_value_within_tolerance_passes_syrupys_assertion_with_its_stage_row(pytester, monkeypatch):
    result, rows, report = run_gate(pytester, monkeypatch, [[1.0 + 1e-6, -2.0], [0.5, 0.25]])
    result.assert_outcomes(passed=1)
    assert report["summary"]["alpha"] == {"M2": "PASS"}
    assert [(r["stage"], r["source"], r["status"]) for r in rows] == [("mean_activations", "snapshot", "PASS")]
    assert float(rows[0]["rel_drift"]) == pytest.approx(5e-7)


def test_a_perturbed_value_fails_through_syrupys_assertion_naming_the_worst_entry(pytester, monkeypatch):
    result, rows, report = run_gate(pytester, monkeypatch, [[1.0, -2.0], [0.5 + 1e-3, 0.25]])
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # syrupy's assertion, with its diff lines: the measured drift, the tolerance and the worst entry.
    assert "syrupy: snapshot test_mean_activations[alpha][k].json == fvkit's M2 numbers failed" in out
    assert "exceeds tolerance MEAN_ACT_REL_TOL=1e-05" in out
    assert "drift 5.000e-04 of the largest |reference| entry (2)" in out
    assert "at index [1, 0] (fvkit 0.501, reference 0.5)" in out
    assert "1 snapshot failed." in out  # syrupy's own session counted the failed assertion
    # The report still has the stage's row, with the numbers syrupy's diff showed.
    assert report["summary"]["alpha"] == {"M2": "FAIL"}
    assert [(r["stage"], r["source"], r["status"], r["worst_index"]) for r in rows] == [
        ("mean_activations", "snapshot", "FAIL", "[1, 0]")]
