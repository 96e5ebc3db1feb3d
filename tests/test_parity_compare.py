"""Gate comparisons (fvkit.parity.compare, fvkit.parity.tolerances), each shown to fail on broken input."""

import math

import pytest
import torch

from fvkit.parity.compare import compare_gate, compare_top_heads, gate_part, token_cause
from fvkit.parity.drift import first_mismatch, tensor_drift
from fvkit.parity.tolerances import MEAN_ACT_REL_TOL


def test_identical_tensors_have_zero_drift():
    ref = torch.randn(2, 3, 4, 5)
    drift = tensor_drift("mean_activations", ref.clone(), ref.tolist(), MEAN_ACT_REL_TOL, "MEAN_ACT_REL_TOL")
    assert drift.ok and drift.max_abs_drift == 0.0 and drift.rel_drift == 0.0


def test_drift_above_tolerance_names_stage_drift_tolerance_and_index():
    ref = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    ours = ref.clone()
    ours[1, 2, 3, 4] += 3e-5 * float(ref.abs().max())
    drift = tensor_drift("mean_activations", ours, ref, MEAN_ACT_REL_TOL, "MEAN_ACT_REL_TOL", source="snapshot")
    assert not drift.ok and drift.worst_index == (1, 2, 3, 4)
    assert drift.rel_drift == pytest.approx(3e-5, rel=1e-3)
    msg = drift.message()
    assert msg.startswith("mean_activations vs snapshot: drift 3.000e-05")
    assert "exceeds tolerance MEAN_ACT_REL_TOL=1e-05" in msg and "index [1, 2, 3, 4]" in msg


def test_drift_within_tolerance_passes():
    ref = torch.ones(3, 3)
    ours = ref + 5e-6
    assert tensor_drift("x", ours, ref, 1e-5, "T").ok


def test_shape_mismatch_and_non_finite_values_fail():
    assert "shape [2, 3] differs" in tensor_drift("x", torch.zeros(2, 3), torch.zeros(3, 2), 1e-5, "T").message()
    bad = torch.zeros(2, 2)
    bad[0, 1] = math.nan
    drift = tensor_drift("x", bad, torch.zeros(2, 2), 1e-5, "T")
    assert not drift.ok and "non-finite" in drift.problem


def test_all_zero_reference_admits_no_drift():
    assert not tensor_drift("x", torch.tensor([1e-9]), [0.0], 1e-5, "T").ok
    assert tensor_drift("x", torch.tensor([0.0]), [0.0], 1e-5, "T").ok


def test_first_mismatch_walks_into_structures():
    assert first_mismatch({"a": [1, 2, {"b": "x"}]}, {"a": [1, 2, {"b": "y"}]}, "r").path == "r['a'][2]['b']"
    assert first_mismatch([1, 2], [1, 2, 3], "r").path == "r length"
    assert first_mismatch({1: 2}, {"1": 2}) is None and first_mismatch([1], [1.0]) is None


def m1(ids, text, labels=None):
    return {"m1": {"prompts": {"mean_activations": [text]}, "token_ids": ids,
                   "token_labels": labels or [[i, f"t{t}", "x"] for i, t in enumerate(ids)],
                   "dummy_labels": [[0, "x"]], "idx_map": {"0": 0}}}


def test_m1_extra_bos_token_is_blamed_on_the_bos_policy():
    check = compare_gate("M1", m1([1, 5, 6], "Q: a"), m1([5, 6], "Q: a"), "snapshot", bos_ids=(1,))
    assert not check.ok
    text = "\n".join(check.failures())
    assert "first differing token at position 0" in text and "'t1' (id 1)" in text and "cause: BOS policy" in text


def test_m1_same_text_other_ids_is_blamed_on_the_tokenizer():
    check = compare_gate("M1", m1([5, 7, 6], "Q: a"), m1([5, 8, 6], "Q: a"), "snapshot")
    text = "\n".join(check.failures())
    assert "position 1" in text and "cause: tokenizer" in text


def test_m1_different_prompt_text_is_named():
    check = compare_gate("M1", m1([5, 6], "Q: a"), m1([5, 6], "Q: b"), "live reference")
    assert "m1.prompts vs live reference: prompts['mean_activations'][0]" in check.failures()[0]
    assert token_cause(m1([5], "<|endoftext|>Q: a")["m1"], m1([6], "Q: a")["m1"], 0).startswith("BOS policy")


def test_top_heads_must_be_identical_up_to_score_rounding():
    ref = [[1, 2, 0.1234], [0, 1, 0.05]]
    assert compare_top_heads([[1, 2, 0.1235], [0, 1, 0.05]], ref) is None
    assert compare_top_heads([[0, 1, 0.05], [1, 2, 0.1234]], ref).path == "top_heads[0] (layer, head)"
    assert "score" in compare_top_heads([[1, 2, 0.1237], [0, 1, 0.05]], ref).path


def m4(rank=0, fv=1.0):
    ev = {"clean_rank_list": [0, rank], "intervention_rank_list": [0, 0], "clean_topk": [[1, 0.5]],
          "intervention_topk": [[1, 1.0]], "max_abs_logit_change": 3.0, "n_items": 2}
    return {"top_heads": [[0, 0, 0.5]], "function_vector": [[fv, 2.0]], "zero_shot": ev, "shuffled": dict(ev),
            "baseline": {"clean_rank_list": [0, 1], "clean_topk": [[1, 0.5]]}}


def test_m4_compares_ranks_exactly_and_the_function_vector_with_tolerance():
    assert compare_gate("M4", m4(), m4(), "snapshot").ok
    failures = compare_gate("M4", m4(rank=3), m4(), "snapshot").failures()
    assert any("zero_shot.clean_rank_list[1]: fvkit 3 != reference 0" in f for f in failures)
    failures = compare_gate("M4", m4(fv=1.001), m4(), "snapshot").failures()
    assert failures and "function_vector vs snapshot: drift" in failures[0] and "FV_REL_TOL=1e-05" in failures[0]


def test_gate_part_keeps_only_compared_keys():
    part = gate_part("M4", m4())
    assert "max_abs_logit_change" not in part["zero_shot"] and set(part["baseline"]) == {"clean_rank_list", "clean_topk"}
    assert set(gate_part("M2", {"mean_activations": [1], "m1": {}})) == {"mean_activations"}


def sweep(ranks_per_layer):
    """A layer sweep part: zero-shot only, one evaluation per layer."""
    return {"layer_sweep": {"zero_shot": [
        {"clean_rank_list": [0, 1], "intervention_rank_list": list(r), "clean_topk": [[1, 0.5]],
         "intervention_topk": [[1, sum(x < 1 for x in r) / 2]], "max_abs_logit_change": 1.0} for r in ranks_per_layer]}}


def test_layer_sweep_ranks_are_compared_layer_by_layer():
    ref = sweep([[0, 0], [0, 5], [2, 2]])
    assert compare_gate("M4", gate_part("M4", sweep([[0, 0], [0, 5], [2, 2]]), ("layer_sweep",)), ref).ok
    check = compare_gate("M4", sweep([[0, 0], [0, 4], [2, 2]]), ref, "live reference")
    assert not check.ok
    assert any("layer_sweep.zero_shot[layer 1].intervention_rank_list[1]: fvkit 4 != reference 5" in f
               for f in check.failures())
    shifted = compare_gate("M4", sweep([[0, 0], [0, 5]]), ref, "snapshot")
    assert any("number of layers" in f for f in shifted.failures())


def test_gate_part_of_a_sweep_drops_uncompared_keys():
    part = gate_part("M4", sweep([[0, 1]]), ("layer_sweep",))
    assert set(part) == {"layer_sweep"} and "max_abs_logit_change" not in part["layer_sweep"]["zero_shot"][0]
