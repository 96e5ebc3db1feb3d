"""Gate M3: causal indirect effect of every head (trials x layers x heads), both modes.

    pytest parity_tests/test_m3_indirect_effect.py --model tiny-llama

``exact`` patches one head per full forward pass, as the reference does;
``fast`` reuses the clean pass and recomputes the last position only. Each mode
must be within IE_REL_TOL of the largest absolute reference effect. A mode
that ``--ie-mode`` leaves out has no test (real checkpoints check the fast mode
only unless ``--ie-mode`` is given; the report names what was left out). The
fast mode is skipped only when fvkit itself reports it unavailable
(NotImplementedError); an
ImportError from fvkit's fast path is a failure, and so is a fast path that
gave up its block replay for the whole-model fallback
(:mod:`fvkit.parity.fast_strategy`).
"""

import pytest

from fvkit.parity.fast_strategy import fallback_check
from fvkit.parity.gate_runner import Gate

pytestmark = pytest.mark.fvkit_gate("M3")


@pytest.mark.fvkit_check("exact")
def test_indirect_effect(parity, parity_model, gate_context):
    gate = Gate("M3", gate_context, label="exact")
    gate.prepare()
    gate.check(parity.comparable(parity_model))


@pytest.mark.fvkit_check("fast")
def test_indirect_effect_fast(parity, parity_model, gate_context):
    gate = Gate("M3", gate_context, label="fast")
    gate.prepare()
    try:
        ie, seconds = parity.indirect_effect(parity_model, "fast")
    except NotImplementedError as err:
        pytest.skip(f"fvkit reports the fast indirect-effect mode unavailable: {err}")
    except ImportError as err:
        # fvkit's own fast path failing to import is a broken fvkit, not an unavailable mode.
        pytest.fail(f"{gate.head}: fvkit's fast indirect-effect path failed to import: "
                    f"{type(err).__name__}: {err}", pytrace=False)
    fallback, row = fallback_check(parity.model(parity_model))
    gate_context.recorder.add(timings={"indirect_effect_fast": seconds}, stage_rows=[row])
    gate.check({"indirect_effect": ie.tolist()}, guard_failures=fallback)
