"""Gate M1: prompts, token ids, token meta-labels, dummy labels and slot maps.

    pytest parity_tests/test_m1_prompts.py --model tiny-llama

fvkit's prompt strings for every stage, the token ids and meta-labels of the
first mean-activations prompt, the dummy (one-token-per-word) labels and the
slot index map must equal the reference's exactly. The fixed trials must replay
the reference's sampling: the file must be exactly what the reference's draws
give for its seed (checked here by drawing again) and the split must be the
reference loader's. A token mismatch names the first differing token and
whether the BOS policy or the tokenizer is the cause.
"""

import pytest

from fvkit.method.fixed_trials import FixedTrials
from fvkit.parity.gate_runner import Gate
from fvkit.parity.drift import first_mismatch

pytestmark = pytest.mark.fvkit_gate("M1")


def trials_replay_failures(parity) -> list:
    """Differences between the trials in use and a fresh draw with their seed."""
    trials = parity.trials
    redrawn = FixedTrials.make(parity.dataset, trials.n_trials, trials.n_shots, trials.seed, trials.test_size)
    ours = {"split": trials.split, "stages": {s: [t.as_dict() for t in ts] for s, ts in trials.stages.items()}}
    fresh = {"split": redrawn.split, "stages": {s: [t.as_dict() for t in ts] for s, ts in redrawn.stages.items()}}
    mismatch = first_mismatch(ours, fresh, "trials")
    if mismatch is None:
        return []
    return [f"fixed trials {trials.id} ({parity.trials_source}) do not replay the reference's sampling with seed "
            f"{trials.seed}: {mismatch.message()} (file vs fresh draw); regenerate the file with `fvkit trials`"]


def test_prompts(parity, parity_model, gate_context):
    replay = trials_replay_failures(parity)
    if replay:
        pytest.fail("M1 prompts: " + "; ".join(replay), pytrace=False)
    gate = Gate("M1", gate_context)
    gate.prepare()
    gate.check(parity.comparable(parity_model))
