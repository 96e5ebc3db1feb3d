"""The tolerant syrupy snapshot extension (fvkit.parity.snapshots)."""

import json

from fvkit.parity.snapshots import FORMAT, extension_for, settings_key


def reference_payload(values, env="4.49.0"):
    return {"format": FORMAT, "gate": "M2", "model": "tiny-x", "key": "k", "settings": {},
            "environment": {"transformers": env}, "value": {"mean_activations": values}}


def test_settings_key_names_everything_that_decides_the_numbers():
    assert settings_key("fixed_trials_antonym_t10_s10_seed0", 1, 5, 1) == "fixed_trials_antonym_t10_s10_seed0-mt1-nh5-el1"


def test_serialized_floats_round_trip_exactly():
    ext = extension_for("M2")()
    values = [[0.1 + 1e-17, -3.0000001192092896e-05], [1e300, 5e-324]]
    assert json.loads(ext.serialize(reference_payload(values)))["value"]["mean_activations"] == values


def test_fvkit_payload_matches_within_the_gate_tolerance_only():
    ext = extension_for("M2")()
    stored = ext.serialize(reference_payload([[1.0, -2.0], [0.5, 0.25]]))
    close = ext.serialize({"value": {"mean_activations": [[1.0 + 1e-6, -2.0], [0.5, 0.25]]}})
    far = ext.serialize({"value": {"mean_activations": [[1.0 + 1e-4, -2.0], [0.5, 0.25]]}})
    assert ext.matches(serialized_data=close, snapshot_data=stored)
    assert not ext.matches(serialized_data=far, snapshot_data=stored)
    lines = list(ext.diff_lines(far, stored))
    assert lines and "exceeds tolerance MEAN_ACT_REL_TOL" in lines[0]


def test_reference_payloads_must_match_exactly_so_updates_record_the_new_environment():
    ext = extension_for("M2")()
    a = ext.serialize(reference_payload([[1.0]]))
    assert ext.matches(serialized_data=a, snapshot_data=a)
    assert not ext.matches(serialized_data=ext.serialize(reference_payload([[1.0]], env="4.50.0")), snapshot_data=a)
    assert not ext.matches(serialized_data=ext.serialize(reference_payload([[1.0 + 1e-9]])), snapshot_data=a)


def test_missing_or_corrupt_snapshot_never_matches():
    ext = extension_for("M1")()
    assert not ext.matches(serialized_data='{"value": {}}', snapshot_data=None)
    assert not ext.matches(serialized_data='{"value": {}}', snapshot_data="{not json")


def test_one_extension_class_per_gate():
    assert extension_for("M3") is extension_for("M3") and extension_for("M3").gate == "M3"


def test_syrupys_diff_names_a_token_mismatchs_bos_cause_with_the_asserted_bos_ids():
    ext = extension_for("M1")()

    def m1(ids, text):
        return {"m1": {"prompts": {"mean_activations": [text]}, "token_ids": ids,
                       "token_labels": [[i, f"t{t}", "x"] for i, t in enumerate(ids)],
                       "dummy_labels": [[0, "x"]], "idx_map": {"0": 0}, "idx_avg": {}, "split": {}}}

    stored = json.dumps({"format": FORMAT, "environment": {}, "value": m1([7, 8], "Q: a")})
    asserted = ext.serialize({"value": m1([1, 7, 8], "Q: a"), "bos_ids": [1]})
    assert not ext.matches(serialized_data=asserted, snapshot_data=stored)
    assert any("cause: BOS policy" in line for line in ext.diff_lines(asserted, stored))
