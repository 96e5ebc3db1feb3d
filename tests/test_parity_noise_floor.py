"""Indirect effects below float32's resolution of probabilities are compared at noise level
(fvkit.parity.tolerances.IE_ABS_FLOOR): the gate uses the absolute floor and every part
of the report says so, while real-scale effects keep the relative tolerance."""

import json
from types import SimpleNamespace

import pytest
import torch

from fvkit.parity.compare import compare_gate
from fvkit.parity.gate_runner import Gate, GateContext, Source
from fvkit.parity.records import Comparison, DriftRecord, GateOutcome
from fvkit.parity.report import log_entry
from fvkit.parity.tolerances import FLOAT32_PROB_RESOLUTION, IE_ABS_FLOOR, IE_REL_TOL
from fvkit.report.page import _drift_table

#: One trial of a random tiny model: effects of a few 1e-8 (tiny-gemma's largest is 3.1e-8).
TINY = torch.tensor([[[3.1e-8, -1.2e-8, 4.0e-9], [2.0e-8, 0.0, -7.0e-9]]], dtype=torch.float64)


def ie_check(ours, ref) -> Comparison:
    return compare_gate("M3", {"indirect_effect": ours.tolist()}, {"indirect_effect": ref.tolist()}, "snapshot")


def perturbed(ref, by: float):
    ours = ref.clone()
    ours[0, 1, 2] += by
    return ours


def test_the_floor_takes_over_exactly_below_float32s_resolution_of_probabilities():
    assert IE_ABS_FLOOR == pytest.approx(IE_REL_TOL * FLOAT32_PROB_RESOLUTION)
    assert 1e-12 < IE_ABS_FLOOR < 2e-12


def test_a_tiny_model_ie_within_the_floor_passes_and_is_labelled_noise_level():
    # 9e-13: three times the largest drift measured on the tiny models (3.1e-13, transformers 5.24 against
    # 4.49's reference), 2.9e-5 of this stage's largest |IE|.
    check = ie_check(perturbed(TINY, 9e-13), TINY)
    (drift,) = check.drifts
    assert drift.rel_drift > IE_REL_TOL  # the relative tolerance alone would fail it
    assert check.ok and drift.noise_level and drift.allowed == IE_ABS_FLOOR
    row = drift.stage_row()
    assert row.status == "PASS" and row.tolerance_name == "IE_ABS_FLOOR" and row.tolerance == IE_ABS_FLOOR
    assert row.detail.startswith("noise level: the largest |reference| entry 3.1e-08 is below")
    assert "within IE_ABS_FLOOR" in drift.message()


def test_a_tiny_model_ie_drift_above_the_floor_fails():
    check = ie_check(perturbed(TINY, 3 * IE_ABS_FLOOR), TINY)
    (drift,) = check.drifts
    assert not check.ok and drift.noise_level
    (failure,) = check.failures()
    assert "noise level" in failure and "exceeds IE_ABS_FLOOR=1.19209e-12" in failure and "index [0, 1, 2]" in failure


def test_a_real_scale_ie_uses_the_relative_tolerance():
    real = TINY * (0.05 / 3.1e-8)  # largest |IE| 0.05
    within = ie_check(perturbed(real, 0.5 * IE_REL_TOL * 0.05), real)
    beyond = ie_check(perturbed(real, 2 * IE_REL_TOL * 0.05), real)
    assert within.ok and not within.drifts[0].noise_level
    assert not beyond.ok and not beyond.drifts[0].noise_level
    assert "exceeds tolerance IE_REL_TOL=1e-05" in beyond.failures()[0]
    row = beyond.drifts[0].stage_row()
    assert row.tolerance_name == "IE_REL_TOL" and "noise level" not in row.detail
    # The floor is far below what the relative tolerance allows at 0.01 and up: it never loosens those.
    assert IE_ABS_FLOOR < IE_REL_TOL * 0.01 * 1e-3


def test_other_stages_have_no_floor():
    tiny = TINY.reshape(1, 1, 2, 3)
    check = compare_gate("M2", {"mean_activations": perturbed(TINY, 9e-13).reshape(1, 1, 2, 3).tolist()},
                         {"mean_activations": tiny.tolist()}, "snapshot")
    assert not check.ok and not check.drifts[0].noise_level


def test_noise_level_reaches_the_json_the_log_and_the_page():
    check = ie_check(perturbed(TINY, 9e-13), TINY)
    as_json = json.loads(json.dumps(check.as_dict()))
    assert as_json["drifts"][0]["noise_level"] is True and as_json["drifts"][0]["abs_floor_name"] == "IE_ABS_FLOOR"
    back = Comparison.from_dict("M3", as_json)
    assert back.drifts[0].noise_level and back.ok
    outcome = GateOutcome("x::test_indirect_effect[tiny]", "tiny", "M3", "test_indirect_effect",
                          comparisons={"M3[exact]": {"snapshot": back}})
    assert "[indirect_effect vs snapshot: noise level: the largest |reference| entry" in log_entry(outcome)
    report = {"summary": {"tiny": {"M3": "PASS"}},
              "models": {"tiny": {"gates": {"M3": {"status": "PASS", "tests": [GateOutcome.as_dict(outcome)]}}}}}
    page = _drift_table(report)
    assert "IE_ABS_FLOOR" in page and "noise level" in page and "75.50%" in page


def test_an_old_report_without_floor_fields_reads_back_as_before():
    old = {"stage": "indirect_effect", "source": "snapshot", "max_abs_drift": 1e-13, "rel_drift": 3e-6,
           "ref_max_abs": 3.1e-8, "tolerance": IE_REL_TOL, "tolerance_name": "IE_REL_TOL", "worst_index": [0, 0, 0],
           "shape": [1, 2, 3], "ok": True}
    drift = DriftRecord.from_dict(old)
    assert drift.ok and not drift.noise_level and drift.floor == 0.0


def test_the_gate_runner_writes_a_noise_level_row():
    shipped = []
    ctx = GateContext(model="tiny", settings=SimpleNamespace(key="k", as_dict=lambda: {}), live=None, snapshot=None,
                      update=False, recorder=SimpleNamespace(add=lambda **data: shipped.append(data)))
    gate = Gate("M3", ctx, label="exact")
    gate.found, gate.missing = [Source("live reference", {"indirect_effect": TINY.tolist()})], []
    gate.check({"indirect_effect": perturbed(TINY, 9e-13).tolist()})
    (row,) = shipped[-1]["stage_rows"]
    assert row.stage == "indirect_effect [exact]" and row.status == "PASS" and row.detail.startswith("noise level")
