"""A zoo model's own parity settings, and gate tests that exist only for the checks a run makes.

The real checkpoints' reference numbers are stored for 3 trials with the layer
sweep (ZooEntry.parity); a default session must use exactly those on them, and
the command line must still override them. A check the run does not make (fvkit's
exact indirect effect on a real checkpoint, a sweep nobody asked for) has no test
id at all, and the report's notes say so.
"""

import os
import shutil
from pathlib import Path

import pytest

from fvkit.models.zoo import REAL_PARITY_MODELS, TINY_PARITY_MODELS, ZOO
from fvkit.parity.options import IE_MODES, ParityOptions
from fvkit.parity.session import ModelInfo, ParitySession

REPO = Path(__file__).resolve().parents[1]
#: Layer counts of the models used below, so that no checkpoint is read.
LAYERS = {"smollm2-135m": (30, 9), "gemma3-270m": (18, 4), "tiny-llama": (3, 4)}


def session(**options) -> ParitySession:
    ps = ParitySession.create(ParityOptions(**options), REPO)
    ps._infos.update({name: ModelInfo(name, name, ZOO[name].spec, *dims) for name, dims in LAYERS.items()})
    return ps


def test_real_checkpoints_are_default_parity_models_with_their_own_settings():
    assert set(REAL_PARITY_MODELS) == {"smollm2-135m", "gemma3-270m"}
    assert all(ZOO[m].trained and ZOO[m].parity.max_trials == 3 and ZOO[m].parity.sweep for m in REAL_PARITY_MODELS)
    assert all(ZOO[m].parity is None for m in TINY_PARITY_MODELS)


def test_a_real_checkpoint_runs_at_the_settings_of_its_stored_reference_numbers():
    s = session().settings_for("smollm2-135m")
    assert (s.max_trials, s.n_trials_used, s.n_top_heads, s.edit_layer, s.sweep) == (3, 3, 10, 15, True)
    assert s.key.endswith("-mt3-nh10-el15")
    assert any("its own parity settings, 3 trials and the layer sweep" in n for n in s.notes)
    assert session().settings_for("gemma3-270m").key.endswith("-mt3-nh10-el9")


def test_the_command_line_overrides_a_models_own_settings():
    s = session(max_trials=2, edit_layer=15).settings_for("smollm2-135m")
    assert (s.max_trials, s.n_trials_used, s.sweep) == (2, 2, False)
    assert not any("own parity settings" in n for n in s.notes)
    assert session(sweep=True).settings_for("smollm2-135m").sweep


def test_a_tiny_model_keeps_the_suite_defaults():
    s = session().settings_for("tiny-llama")
    assert (s.max_trials, s.n_trials_used, s.sweep, s.notes) == (None, 10, False, ())


def test_not_checked_names_what_a_run_leaves_out():
    ps = session()
    assert ps.not_checked("smollm2-135m", "fast") is None and ps.not_checked("smollm2-135m", "sweep") is None
    assert "--ie-mode both" in ps.not_checked("smollm2-135m", "exact")
    assert ps.not_checked("tiny-llama", "exact") is None
    assert "--edit-layer all" in ps.not_checked("tiny-llama", "sweep")
    ps = session(ie_modes=IE_MODES["fast"], ie_mode_given=True)
    assert ps.not_checked("tiny-llama", "exact") == "M3's exact mode (--ie-mode fast)"


@pytest.mark.slow
def test_a_check_the_run_does_not_make_has_no_test_id(pytester, monkeypatch):
    """Collected in a copy of the suite: without the sweep and with the fast mode only, tiny-llama
    has no layer-sweep and no exact-mode test; with the defaults of pytest.ini it has both."""
    for name in ("parity_tests",):
        shutil.copytree(REPO / name, pytester.path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pytest.ini", "conftest.py"):
        shutil.copy(REPO / name, pytester.path / name)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    common = ("parity_tests", "--data-dir", str(REPO / "datasets"), "-p", "no:cacheprovider", "--collect-only", "-q",
              "--model", "tiny-llama")

    narrow = pytester.runpytest_subprocess(*common, "--edit-layer", "1", "--ie-mode", "fast", timeout=300).stdout.str()
    assert "test_indirect_effect_fast[tiny-llama]" in narrow
    assert "test_indirect_effect[tiny-llama]" not in narrow and "test_layer_sweep[" not in narrow
    # Deselected, not pytest's skipped "empty parameter set".
    assert "skipped" not in narrow and "NOTSET" not in narrow and "(2 deselected)" in narrow

    full = pytester.runpytest_subprocess(*common, timeout=300).stdout.str()
    assert "test_indirect_effect[tiny-llama]" in full and "test_layer_sweep[tiny-llama]" in full
