"""A stage only one side produced fails its gate, and only compared stages get a PASS row.

fvkit.parity.compare (presence of every stage a gate reads), fvkit.parity.records
(``Comparison.stage_rows``) and fvkit.parity.gate_runner (``Gate.check``, stages the
reference declared unsupported).
"""

from types import SimpleNamespace

import pytest

from fvkit.parity.compare import compare_gate
from fvkit.parity.gate_runner import Gate, GateContext, Source
from fvkit.parity.registry import gate_def


def evaluation():
    return {"clean_rank_list": [0, 1], "intervention_rank_list": [0, 0], "clean_topk": [[1, 0.5]],
            "intervention_topk": [[1, 1.0]]}


def m4(**drop):
    part = {"top_heads": [[0, 0, 0.5]], "function_vector": [[1.0, 2.0]], "zero_shot": evaluation(),
            "shuffled": evaluation(), "baseline": {"clean_rank_list": [0, 1], "clean_topk": [[1, 0.5]]}}
    return {k: v for k, v in part.items() if k not in drop}


def m1(**drop):
    part = {"prompts": {"mean_activations": ["a"]}, "token_ids": [1, 2], "token_labels": [[0, "a", "x"]],
            "dummy_labels": [[0, "x"]], "idx_map": {"0": 0}, "split": "train"}
    return {"m1": {k: v for k, v in part.items() if k not in drop}}


def rows_of(check, gate: str, keys=None):
    definition = gate_def(gate)
    return {r.stage: r for r in check.stage_rows(definition.exact_stages_of(keys or definition.result_keys))}


@pytest.mark.parametrize("stage", ["baseline", "top_heads", "shuffled"])
def test_an_m4_stage_only_the_reference_produced_fails(stage):
    check = compare_gate("M4", m4(**{stage: 1}), m4(), "snapshot")
    assert not check.ok
    assert any(f"{stage}: produced by the reference, not by fvkit" in f for f in check.failures())
    rows = rows_of(check, "M4")
    assert rows[stage].status == "FAIL" and "fvkit's pipeline left this stage out" in rows[stage].detail


@pytest.mark.parametrize("stage", ["baseline", "top_heads", "zero_shot"])
def test_an_m4_stage_only_fvkit_produced_fails(stage):
    check = compare_gate("M4", m4(), m4(**{stage: 1}), "snapshot")
    assert not check.ok
    assert any(f"{stage}: produced by fvkit, not by the reference" in f for f in check.failures())
    assert rows_of(check, "M4")[stage].status == "FAIL"


def test_a_function_vector_on_one_side_only_fails_with_a_message():
    for ours, ref, side in ((m4(function_vector=1), m4(), "by the reference"), (m4(), m4(function_vector=1), "by fvkit")):
        check = compare_gate("M4", ours, ref, "live reference")
        assert any(f"function_vector: produced {side}" in f for f in check.failures())
        assert rows_of(check, "M4")["function_vector"].status == "FAIL"


def test_a_key_inside_an_evaluation_on_one_side_only_fails():
    ref = m4()
    del ref["zero_shot"]["intervention_topk"]
    check = compare_gate("M4", m4(), ref, "snapshot")
    assert any("zero_shot.intervention_topk: produced by fvkit, not by the reference" in f for f in check.failures())


def test_a_sweep_stage_on_one_side_only_fails():
    layers = [evaluation(), evaluation()]
    ours = {"layer_sweep": {"zero_shot": layers, "shuffled": layers}}
    check = compare_gate("M4", ours, {"layer_sweep": {"zero_shot": layers}}, "snapshot")
    assert any("layer_sweep.shuffled: produced by fvkit, not by the reference" in f for f in check.failures())
    rows = rows_of(check, "M4", ("layer_sweep",))
    assert rows["layer_sweep.zero_shot"].status == "PASS" and rows["layer_sweep.shuffled"].status == "FAIL"


@pytest.mark.parametrize("gate,key", [("M2", "mean_activations"), ("M3", "indirect_effect")])
def test_a_tensor_gate_with_an_empty_reference_fails_instead_of_crashing(gate, key):
    check = compare_gate(gate, {key: [[1.0]]}, {}, "snapshot")
    assert not check.ok and any(f"{key}: produced by fvkit, not by the reference" in f for f in check.failures())
    check = compare_gate(gate, {}, {key: [[1.0]]}, "snapshot")
    assert not check.ok and any(f"{key}: produced by the reference, not by fvkit" in f for f in check.failures())


def test_an_m1_key_the_reference_lacks_fails():
    check = compare_gate("M1", m1(), m1(split=1), "snapshot")
    assert not check.ok
    assert any("split: produced by fvkit, not by the reference" in f for f in check.failures())
    rows = rows_of(check, "M1")
    assert rows["m1.split"].status == "FAIL" and rows["m1.prompts"].status == "PASS"


def test_nothing_compared_is_not_a_match():
    check = compare_gate("M4", {}, {}, "snapshot")
    assert not check.ok and any("nothing compared" in f for f in check.failures())


def test_only_compared_stages_get_a_pass_row():
    check = compare_gate("M4", m4(), m4(), "snapshot")
    assert check.ok
    rows = rows_of(check, "M4", gate_def("M4").result_keys + ("layer_sweep",))
    # Neither side ran the layer sweep: no row claims it matched.
    assert not any(stage.startswith("layer_sweep") for stage in rows)
    assert {s for s, r in rows.items() if r.status == "PASS"} == {"top_heads", "function_vector", "zero_shot",
                                                                  "shuffled", "baseline"}


class Shipped:
    def __init__(self):
        self.findings = []

    def add(self, **data):
        self.findings.append(data)


def gate_with(source: Source, gate: str = "M4") -> tuple:
    settings = SimpleNamespace(key="k", as_dict=lambda: {})
    recorder = Shipped()
    ctx = GateContext(model="tiny", settings=settings, live=None, snapshot=None, update=False, recorder=recorder)
    runner = Gate(gate, ctx)
    runner.found, runner.missing = [source], []
    return runner, recorder


def test_a_stage_the_reference_declared_unsupported_is_not_compared_and_not_passed():
    runner, recorder = gate_with(Source("live reference", m4(zero_shot=1, shuffled=1),
                                        unsupported={"zero_shot": "hook layout", "shuffled": "hook layout"}))
    runner.check(m4())
    rows = {r.stage: r for r in recorder.findings[-1]["stage_rows"]}
    assert rows["zero_shot"].status == "NOT COMPARED"
    assert rows["zero_shot"].detail == "reference cannot compute: hook layout"
    assert rows["baseline"].status == "PASS"


def test_an_undeclared_missing_stage_fails_the_gate_test():
    runner, recorder = gate_with(Source("snapshot", m4(baseline=1)))
    with pytest.raises(pytest.fail.Exception, match="baseline: produced by fvkit, not by the reference"):
        runner.check(m4())
    rows = {r.stage: r for r in recorder.findings[-1]["stage_rows"]}
    assert rows["baseline"].status == "FAIL"
