"""M1 compares the fixed trials with the draws the reference itself made, and the
multi-token words its slot map averages (``idx_avg``); each check shown to fail.

The reference's draws are read from a stored snapshot, which a live reference run
wrote (parity_tests/reference/recording.py records them from the prompt data each
reference stage built); fvkit's side is ``FixedTrials.draws``.
"""

import copy
import json
from pathlib import Path

import pytest

from fvkit.method.data import load_task_dataset
from fvkit.method.fixed_trials import FixedTrials
from fvkit.parity.compare import compare_gate

ROOT = Path(__file__).resolve().parents[1]
TRIALS = ROOT / "datasets" / "fixed_trials" / "fixed_trials_present-past_t10_s10_seed0.json"
#: The quick-settings snapshot of one tiny model (max_trials 1): its draws are the reference's own.
SNAPSHOT = (ROOT / "parity_tests" / "__snapshots__" / "test_m1_prompts" /
            "test_prompts[tiny-llama][fixed_trials_present-past_t10_s10_seed0-mt1-nh5-el1].json")


@pytest.fixture(scope="module")
def reference_m1() -> dict:
    if not SNAPSHOT.is_file():
        pytest.fail(f"{SNAPSHOT.name} is missing; regenerate the snapshots (docs/parity_suite.md)")
    return json.loads(SNAPSHOT.read_text())["value"]["m1"]


@pytest.fixture(scope="module")
def dataset():
    return load_task_dataset("present-past")


def with_draws(m1: dict, draws: dict) -> dict:
    ours = copy.deepcopy(m1)
    ours["draws"] = draws
    return {"m1": ours}


def test_shipped_trials_give_the_references_own_draws(reference_m1, dataset):
    trials = FixedTrials.load(TRIALS, dataset)
    assert trials.draws(dataset, max_trials=1) == reference_m1["draws"]
    check = compare_gate("M1", with_draws(reference_m1, trials.draws(dataset, 1)), {"m1": reference_m1}, "snapshot")
    assert check.ok and "m1.draws" in check.compared


@pytest.mark.parametrize("stage, item", [("mean_activations", 0), ("shuffled", 7), ("baseline", 64)])
def test_one_swapped_demonstration_fails_m1_and_is_named(reference_m1, dataset, stage, item):
    trials = FixedTrials.load(TRIALS, dataset)
    demos = trials.stages[stage][item].demos
    demos[2], demos[5] = demos[5], demos[2]
    check = compare_gate("M1", with_draws(reference_m1, trials.draws(dataset, 1)), {"m1": reference_m1}, "snapshot")
    assert not check.ok
    message = "\n".join(check.failures())
    # The first difference is named down to the pair (with shuffled labels it may be
    # another position: the label order indexes the swapped demonstrations).
    assert f"draws['{stage}'][{item}]['demos'][" in message
    assert "fvkit trials" in message


def test_a_different_query_fails_m1(reference_m1, dataset):
    trials = FixedTrials.load(TRIALS, dataset)
    trials.stages["indirect_effect"][0].query += 1
    check = compare_gate("M1", with_draws(reference_m1, trials.draws(dataset, 1)), {"m1": reference_m1}, "snapshot")
    assert "draws['indirect_effect'][0]['query']" in "\n".join(check.failures())


def test_draws_missing_from_the_reference_numbers_fail(reference_m1):
    ref = copy.deepcopy(reference_m1)
    del ref["draws"]
    check = compare_gate("M1", {"m1": reference_m1}, {"m1": ref}, "snapshot")
    assert not check.ok and "draws: produced by fvkit, not by the reference" in "\n".join(check.failures())


def test_an_idx_avg_difference_fails_m1(reference_m1):
    assert reference_m1["idx_avg"], "the snapshot's first prompt has multi-token words"
    ours = copy.deepcopy(reference_m1)
    label = next(iter(ours["idx_avg"]))
    ours["idx_avg"][label] = [ours["idx_avg"][label][0], ours["idx_avg"][label][1] + 1]
    check = compare_gate("M1", {"m1": ours}, {"m1": reference_m1}, "snapshot")
    assert not check.ok and "m1.idx_avg" in check.compared
    assert f"idx_avg[{label!r}]" in "\n".join(check.failures())
    assert compare_gate("M1", {"m1": reference_m1}, {"m1": reference_m1}, "snapshot").ok
