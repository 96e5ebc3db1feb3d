"""Gate M1: the draws, prompts, token ids, token meta-labels, dummy labels and slot maps.

    pytest parity_tests/test_m1_prompts.py --model tiny-llama

The fixed trials must give the pairs the reference's own sampling drew: for
every stage, each prompt's demonstration pairs (in prompt order, labels as
shuffled) and query pair, recorded from the live reference run, and the split
its loader made. fvkit's prompt strings for every stage, the token ids and
meta-labels of the first mean-activations prompt, the dummy
(one-token-per-word) labels, the slot index map and the multi-token words it
averages must equal the reference's exactly. A mismatch names the first
difference (stage, trial, pair); a token mismatch also says whether the BOS
policy or the tokenizer is the cause.
"""

import pytest

from fvkit.parity.gate_runner import Gate

pytestmark = pytest.mark.fvkit_gate("M1")


def test_prompts(parity, parity_model, gate_context):
    gate = Gate("M1", gate_context)
    gate.prepare()
    gate.check(parity.comparable(parity_model))
