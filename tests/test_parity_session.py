"""Per-model settings, ids and trials of a parity session (fvkit.parity.session)."""

from pathlib import Path

import pytest

from fvkit.errors import DataError, FvkitError
from fvkit.parity.options import ParityOptions
from fvkit.parity.session import ModelInfo, ParitySession, model_id

REPO = Path(__file__).resolve().parents[1]


def session(**opts) -> ParitySession:
    options = ParityOptions(data_dir=REPO / "datasets", **opts)
    ps = ParitySession.create(options, REPO)
    ps._infos["tiny-x"] = ModelInfo("tiny-x", "tiny-x", "llama", n_layers=3, n_heads=2)
    return ps


def test_defaults_use_the_shipped_trials_and_cap_top_heads():
    ps = session()
    assert ps.trials.id == "fixed_trials_present-past_t10_s10_seed0" and ps.notes == []
    s = ps.settings_for("tiny-x")
    assert (s.n_trials_used, s.n_top_heads, s.edit_layer) == (10, 6, 1)
    assert s.key == "fixed_trials_present-past_t10_s10_seed0-mt10-nh6-el1"
    assert "n_top_heads capped at 6" in s.notes[0]


def test_explicit_settings_out_of_range_name_the_valid_range():
    with pytest.raises(FvkitError, match=r"--edit-layer 3 is out of range for tiny-x: valid layers are 0\.\.2"):
        session(edit_layer=3).settings_for("tiny-x")
    with pytest.raises(FvkitError, match=r"--edit-layer -1 is out of range"):
        session(edit_layer=-1).settings_for("tiny-x")
    with pytest.raises(FvkitError, match=r"--n-top-heads 7 is more than the 6 heads of tiny-x"):
        session(n_top_heads=7).settings_for("tiny-x")


def test_seed_is_noted_when_a_trials_file_overrides_it():
    ps = session(seed=42, seed_given=True)
    assert ps.trials.seed == 0 and "--seed 42 was not used" in ps.notes[0]


def test_without_a_trials_file_the_seed_draws_new_trials():
    ps = session(fixed_trials="generate", seed=3, seed_given=True)
    assert ps.trials.id == "fixed_trials_present-past_t10_s10_seed3" and ps.trials.seed == 3
    assert "drawn now with seed 3" in ps.notes[0]


def test_bad_inputs_fail_with_one_message(tmp_path):
    with pytest.raises(FvkitError, match="--max-trials 11 exceeds the 10 trials"):
        session(max_trials=11)
    bad = tmp_path / "t.json"
    bad.write_text("{}")
    with pytest.raises(DataError, match="format"):
        session(fixed_trials=str(bad))
    with pytest.raises(DataError, match="not found"):
        session(dataset="no-such-task")


def test_model_ids_are_file_safe(tmp_path):
    local = tmp_path / "tiny-gpt2"
    local.mkdir()
    assert model_id("tiny-llama") == "tiny-llama"
    assert model_id(str(local)) == "tiny-gpt2"
    assert model_id("EleutherAI/gpt-j-6b") == "EleutherAI__gpt-j-6b"


def test_log_names_the_spec_on_m5_lines_and_keeps_the_whole_cause():
    from fvkit.parity.report import GateOutcome, log_entry

    m5 = GateOutcome("parity_tests/test_m5_spec_resolution.py::test_spec_resolution[mistral:tiny-mistral]",
                     "tiny-mistral", "M5", "test_spec_resolution", "FAIL", cause="first line\nsecond line")
    line = log_entry(m5)
    assert " M5 spec mistral test_spec_resolution" in line
    assert line.endswith("\n    first line\n    second line")
    m2 = GateOutcome("x::test_mean_activations[tiny-gpt2]", "tiny-gpt2", "M2", "test_mean_activations", "PASS")
    assert "spec" not in log_entry(m2) and "\n" not in log_entry(m2)


def test_model_spec_applies_to_the_models_it_accompanies_only():
    ps = session(models=["tiny-llama"], model_spec="olmo")
    assert ps.spec_for("tiny-llama") == "olmo"
    # M5 checks the other specs on their zoo models, each under its own spec.
    assert ps.spec_for("tiny-mistral") is None
    assert ps.model_info("tiny-mistral").spec == "mistral"


def test_tiny_models_check_both_ie_modes_and_real_checkpoints_only_fast_unless_asked():
    ps = session()
    assert ps.ie_modes_for("tiny-llama") == ("exact", "fast") and ps.pipeline_ie_mode("tiny-llama") == "exact"
    assert ps.ie_modes_for("smollm2-135m") == ("fast",) and ps.pipeline_ie_mode("smollm2-135m") == "fast"
    assert ps.ie_modes_for("/some/checkpoint") == ("fast",)
    asked = session(ie_modes=("exact", "fast"), ie_mode_given=True)
    assert asked.ie_modes_for("smollm2-135m") == ("exact", "fast")
