"""The gate registry is complete and the report records keep what they are given."""

import csv
import io
import json

import pytest

from fvkit.parity import tolerances
from fvkit.parity.records import (
    STAGE_COLUMNS,
    Comparison,
    DriftRecord,
    Findings,
    GateOutcome,
    MismatchRecord,
    RecordError,
    StageRow,
    split_metrics,
)
from fvkit.parity.registry import (
    GATE_DEFS,
    GATES,
    PIPELINE_RESULT_KEYS,
    SWEEP_KEY,
    GateDef,
    GateError,
    check_key,
    gate_def,
    is_check_key,
    model_of_param_id,
    param_id,
    param_id_of_nodeid,
    spec_of_param_id,
)
from fvkit.parity.xdist_scheduling import model_scope


@pytest.mark.parametrize("definition", GATE_DEFS, ids=lambda g: g.name)
def test_every_gate_definition_is_complete(definition):
    assert definition.name in GATES and definition.title
    for name in definition.tolerances + tuple(definition.drift_stages.values()):
        assert name in tolerances.TOLERANCES, f"{definition.name}: tolerance {name} is not in tolerances.py"
    assert set(definition.drift_stages) <= set(definition.result_keys)
    assert set(definition.exact_stages) <= set(definition.result_keys) | {SWEEP_KEY}
    assert set(definition.result_keys) <= set(PIPELINE_RESULT_KEYS)
    if definition.compares:
        assert callable(definition.comparison()) and definition.result_keys
    else:
        with pytest.raises(GateError, match="compares no reference numbers"):
            definition.comparison()


def test_the_pipeline_result_keys_are_what_the_gates_read():
    read = {k for g in GATE_DEFS for k in g.result_keys}
    assert read == set(PIPELINE_RESULT_KEYS)


def test_unknown_gates_and_scopes_are_named_with_the_fix():
    with pytest.raises(GateError, match=r"unknown parity gate 'M9'.*M1, M2, M3, M4, M5"):
        gate_def("M9")
    with pytest.raises(GateError, match="scope 'layer'"):
        GateDef("M6", "x", scope="layer")


def test_a_comparison_given_as_a_callable_is_used_as_it_is():
    def compare(gate, ours, ref, source, bos_ids=()):
        return Comparison(gate.name, source)

    assert GateDef("M6", "custom", result_keys=("x",), compare=compare).comparison() is compare


def test_param_ids_round_trip_through_xdist_scheduling():
    assert param_id("tiny-llama") == "tiny-llama"
    assert param_id("tiny-llama", spec="llama") == "llama:tiny-llama"
    for pid in (param_id("tiny-gpt2"), param_id("tiny-gpt2", spec="gpt2")):
        assert model_of_param_id(pid) == "tiny-gpt2"
        assert model_scope(f"parity_tests/test_m2.py::test_x[{pid}]") == "model:tiny-gpt2"
    assert spec_of_param_id("gpt2:tiny-gpt2") == "gpt2" and spec_of_param_id("tiny-gpt2") is None
    assert param_id_of_nodeid("t.py::test_x[gpt2:tiny-gpt2]") == "gpt2:tiny-gpt2"
    assert param_id_of_nodeid("t.py::test_x") is None and model_scope("t.py::test_x") == "t.py::test_x"


def test_check_keys_tell_comparisons_from_measurements():
    assert check_key("M3", "fast") == "M3[fast]" and check_key("M2") == "M2"
    assert is_check_key("M4[layer sweep]") and is_check_key("M1")
    assert not is_check_key("layer_sweep") and not is_check_key("injection_max_abs_logit_change")


def _comparison():
    drift = DriftRecord("mean_activations", 1e-5, "MEAN_ACT_REL_TOL", max_abs_drift=2e-3, rel_drift=1e-3,
                        ref_scale=2.0, worst_index=(0, 1), shape_ours=(2, 2), shape_ref=(2, 2), source="snapshot")
    mismatch = MismatchRecord.of("prompts[1]", "a", "b").at("m1.prompts", cause="prompt text")
    return Comparison("M2", "snapshot", [drift], [mismatch], ["a note"])


def test_comparisons_round_trip_through_the_report_json():
    check = _comparison()
    data = json.loads(json.dumps(check.as_dict()))
    back = Comparison.from_dict("M2", data)
    assert back.as_dict() == check.as_dict() and not back.ok
    assert back.failures()[1] == "m1.prompts vs snapshot: prompts[1]: fvkit 'a' != reference 'b' [cause: prompt text]"


def test_findings_keep_empty_and_zero_values_across_the_wire():
    findings = Findings(metrics={"count": 0, "flag": False}, timings={"fast": 0.0}, notes=[],
                        comparisons={"M2": {"snapshot": _comparison()}},
                        stage_rows=[StageRow(stage="s", seconds=0.0, detail="")])
    back = Findings.from_dict(json.loads(json.dumps(findings.as_dict())))
    assert back.metrics == {"count": 0, "flag": False} and back.timings == {"fast": 0.0}
    assert back.stage_rows == findings.stage_rows
    assert back.comparisons["M2"]["snapshot"].as_dict() == _comparison().as_dict()


def test_unknown_fields_are_errors_not_dropped_columns():
    with pytest.raises(RecordError, match="unknown field.*colour.*StageRow"):
        StageRow.from_dict({"stage": "s", "colour": "red"})
    with pytest.raises(RecordError, match="findings has unknown field"):
        Findings.from_dict({"metric": {}})


def test_gate_outcome_writes_measurements_then_comparisons_and_reads_them_back():
    outcome = GateOutcome("n", "tiny", "M2", "test_mean_activations", "FAIL", cause="drift",
                          metrics={"spec": {"n_layers": 2}}, comparisons={"M2": {"snapshot": _comparison()}})
    data = outcome.as_dict()
    assert list(data["metrics"]) == ["spec", "M2"]
    back = GateOutcome.from_dict(json.loads(json.dumps(data)), "tiny", "M2")
    assert back.as_dict() == data
    measurements, comparisons = split_metrics(data["metrics"])
    assert list(measurements) == ["spec"] and list(comparisons) == ["M2"]


def test_csv_rows_have_every_column_in_order():
    outcome = GateOutcome("n", "tiny", "M2", "test_x", "SKIP", cause="no snapshot\nmore")
    outcome.stage_rows.extend(_comparison().stage_rows(("m1.prompts",), " [exact]"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=STAGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in outcome.csv_rows():
        writer.writerow(row.as_csv())
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert STAGE_COLUMNS[:4] == ("model", "gate", "stage", "test")
    assert [r["stage"] for r in rows] == ["mean_activations [exact]", "m1.prompts"]
    assert rows[0]["worst_index"] == "[0, 1]" and rows[0]["status"] == "FAIL" and rows[1]["model"] == "tiny"
    empty = GateOutcome("n", "tiny", "M5", "test_y", "SKIP", cause="no snapshot\nmore").csv_rows()
    assert empty[0].detail == "no snapshot" and empty[0].status == "SKIP"


def test_a_gate_module_marked_with_an_unregistered_gate_is_a_usage_error(pytester):
    pytester.makepyfile(test_gate_m9='''
import pytest
pytestmark = pytest.mark.fvkit_gate("M9")

def test_new():
    pass
''')
    result = pytester.runpytest("-p", "fvkit.parity.switch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "fvkit_gate('M9')" in err and "registered gates are M1, M2, M3, M4, M5" in err
    assert "Traceback" not in err


def test_comparisons_filed_under_a_non_gate_key_are_refused():
    with pytest.raises(RecordError, match="under 'drift', which names no registered gate"):
        Findings.from_dict({"comparisons": {"drift": {"snapshot": _comparison()}}})


def test_malformed_findings_make_the_test_an_error_not_a_crash(pytester):
    pytester.makeconftest('''
from fvkit.parity.plugin import report_state

pytest_plugins = ["fvkit.parity.switch"]

def pytest_configure(config):
    report_state(config).bind("synthds", "fixed_trials_synthds_t2_s2_seed0", {})
''')
    pytester.makepyfile(test_gate_m2='''
import pytest
pytestmark = pytest.mark.fvkit_gate("M2")

@pytest.mark.parametrize("model", [pytest.param("alpha", marks=pytest.mark.fvkit_model("alpha"))])
def test_mean_activations(model, request):
    request.node.user_properties.append(("fvkit_result", {"metrix": {}}))
''')
    result = pytester.runpytest()
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    report = json.loads((pytester.path / "results_fv/synthds/fixed_trials_synthds_t2_s2_seed0"
                         / "parity_suite_report.json").read_text())
    gate = report["models"]["alpha"]["gates"]["M2"]
    assert gate["status"] == "ERROR" and "unknown field(s) metrix" in gate["cause"]
