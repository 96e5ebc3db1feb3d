"""A run in which no M1-M4 gate compared anything says so and fails (fvkit.parity.plugin).

Every comparing gate skipped for lack of reference numbers (settings without stored
snapshots, no live reference) checked no parity: the terminal summary and the report
carry a NO COMPARISON note and the session's exit status is non-zero.
"""

from __future__ import annotations

import json

import pytest

from fvkit.parity.plugin import NOTHING_COMPARED
from fvkit.parity.report import REPORT_NAME

from synthetic_suite import REAL_CACHE, SYNTH_CONFTEST, SYNTH_DIR

GATE = '''
import os
import pytest

pytestmark = pytest.mark.fvkit_gate("{gate}")
COMPARISON = {{"source": "snapshot", "ok": True, "drifts": [], "mismatches": [], "compared": ["x"]}}

@pytest.mark.parametrize("model", [pytest.param("alpha", id="alpha", marks=pytest.mark.fvkit_model("alpha"))])
def test_{name}(model, request):
    if "{gate}" in os.environ.get("SYNTH_COMPARES", "").split(","):
        request.node.user_properties.append(("fvkit_result", {{"comparisons": {{"{gate}": {{"snapshot": COMPARISON}}}}}}))
        return
    if "{gate}" != "M5":
        request.node.user_properties.append(("fvkit_result", {{"comparisons": {{}}}}))
        pytest.skip("{gate} for alpha: no reference numbers: no snapshot for these settings")
'''
NAMES = {"M1": "prompts", "M2": "mean_activations", "M3": "indirect_effect", "M4": "function_vector",
         "M5": "spec_resolution"}


@pytest.fixture
def synth(pytester, monkeypatch):
    monkeypatch.setenv("FVKIT_CACHE", REAL_CACHE)
    pytester.makeconftest(SYNTH_CONFTEST)
    for i, (gate, name) in enumerate(NAMES.items(), start=1):
        pytester.makepyfile(**{f"test_gate_m{i}": GATE.format(gate=gate, name=name)})
    return pytester


def report_of(pytester) -> dict:
    return json.loads((pytester.path / SYNTH_DIR / REPORT_NAME).read_text())


def test_a_run_where_every_comparing_gate_skipped_fails_and_says_so(synth, monkeypatch):
    monkeypatch.delenv("SYNTH_COMPARES", raising=False)
    result = synth.runpytest()
    result.assert_outcomes(passed=1, skipped=4)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert f"note: {NOTHING_COMPARED}: none of the 4 test(s) of M1, M2, M3, M4 compared" in out
    assert "no snapshot for these settings" in out
    report = report_of(synth)
    assert any(n.startswith(NOTHING_COMPARED) for n in report["notes"])
    assert report["exit_status"] == int(pytest.ExitCode.TESTS_FAILED)


def test_one_comparison_is_enough(synth, monkeypatch):
    monkeypatch.setenv("SYNTH_COMPARES", "M2")
    result = synth.runpytest()
    result.assert_outcomes(passed=2, skipped=3)
    assert result.ret == pytest.ExitCode.OK
    assert NOTHING_COMPARED not in result.stdout.str()
    assert not any(n.startswith(NOTHING_COMPARED) for n in report_of(synth)["notes"])


def test_a_run_of_m5_only_is_not_flagged(synth, monkeypatch):
    result = synth.runpytest("-k", "spec_resolution")
    assert result.ret == pytest.ExitCode.OK
    assert NOTHING_COMPARED not in result.stdout.str()


def test_a_missing_snapshot_names_the_settings_that_are_stored(tmp_path):
    """Why `fvkit parity --model_name tiny-gpt2 --max_trials 1` compared nothing: its default
    n_top_heads (capped at tiny-gpt2's 9 heads) gives key ...-mt1-nh9-el1, while the stored
    quick-settings snapshots are ...-mt1-nh5-el1; the skip reason names the stored keys."""
    from fvkit.parity.gate_runner import stored_keys

    folder = tmp_path / "test_m2_mean_activations"
    folder.mkdir()
    for key in ("t-mt1-nh5-el1", "t-mt10-nh9-el1"):
        (folder / f"test_mean_activations[tiny-gpt2][{key}].json").write_text("{}")
    (folder / "test_mean_activations[tiny-llama][t-mt1-nh5-el1].json").write_text("{}")
    wanted = folder / "test_mean_activations[tiny-gpt2][t-mt1-nh9-el1].json"
    assert stored_keys(wanted) == ["t-mt1-nh5-el1", "t-mt10-nh9-el1"]
