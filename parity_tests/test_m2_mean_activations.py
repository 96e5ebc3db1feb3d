"""Gate M2: mean head activations (layers x heads x slots x head_dim).

    pytest parity_tests/test_m2_mean_activations.py --model tiny-llama

Passes when the largest absolute difference from the reference is at most
MEAN_ACT_REL_TOL times the largest absolute reference entry
(:mod:`fvkit.parity.tolerances`); a failure names the drift, the tolerance and
the worst index (layer, head, slot, dim).
"""

import pytest

from fvkit.parity.gate_runner import Gate

pytestmark = pytest.mark.fvkit_gate("M2")


def test_mean_activations(parity, parity_model, gate_context):
    gate = Gate("M2", gate_context)
    gate.prepare()
    gate.check(parity.comparable(parity_model))
