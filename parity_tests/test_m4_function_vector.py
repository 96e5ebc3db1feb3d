"""Gate M4: top heads, function vector, and the zero-shot / shuffled / baseline evaluations.

    pytest parity_tests/test_m4_function_vector.py --model tiny-llama

The top-head list and every rank list and top-k accuracy must be identical to
the reference's (a rank may differ only where fvkit's own logits show a float
tie, RANK_TIE_REL_TOL; :mod:`fvkit.parity.rank_ties`); the function vector
within FV_REL_TOL of its largest entry.
fvkit's own injection guard always runs: adding the function vector must move
the intervened logits. So does the decoding check: fvkit's decoded words of the
vector must be the model's own (:mod:`fvkit.parity.vocab_check`). When the live reference declares its intervention
numbers invalid (transformers releases whose blocks return a plain tensor make
its hook a no-op), they are not compared; stored snapshots from a valid
reference still are.

With ``--edit-layer all``, and on the real checkpoints by default, the layer sweep (zero-shot and shuffled-label
evaluations with the vector at every layer, fvkit's cached one-token passes)
must give the reference's per-layer rank lists, as its ``--edit_layer -1`` run
computes them with whole prompts.
"""

import pytest

from fvkit.parity.compare import SWEEP_KEY, sweep_comparable
from fvkit.parity.gate_runner import Gate
from fvkit.parity.rank_ties import EvalLogits, resolve_rank_ties, resolve_sweep_ties
from fvkit.parity.tolerances import MIN_INJECTION_LOGIT_CHANGE
from fvkit.parity.vocab_check import decoding_check

pytestmark = pytest.mark.fvkit_gate("M4")


def injection_guard(result, edit_layer: int) -> tuple:
    """(failures, metrics) of the check that fvkit's injection changed the logits."""
    failures, metrics = [], {}
    for stage in ("zero_shot", "shuffled"):
        change = getattr(result, stage).get("max_abs_logit_change")
        metrics[stage] = change
        if change is None or not change > MIN_INJECTION_LOGIT_CHANGE:
            failures.append(f"{stage} injection guard: adding the function vector at layer {edit_layer} changed the "
                            f"intervened logits by at most {change!r}, not more than MIN_INJECTION_LOGIT_CHANGE="
                            f"{MIN_INJECTION_LOGIT_CHANGE:g}; the edit did not reach the model")
    return failures, metrics


def test_function_vector(parity, parity_model, lm, gate_context):
    gate = Gate("M4", gate_context)
    # With a live reference the guard runs even when its M4 numbers are void.
    gate.prepare(skip_if_none=gate_context.live is None)
    result = parity.pipeline(parity_model)
    edit_layer = gate_context.settings.edit_layer
    failures, changes = injection_guard(result, edit_layer)
    decoding, row = decoding_check(lm, result.function_vector)
    failures += decoding
    # The vector's size against the residual stream, and the warning when it is below 1%:
    # an injection that small shows no effect whatever the heads do.
    gate_context.recorder.add(metrics={"injection_max_abs_logit_change": changes,
                                       "vector_scale": result.vector_scale.get("function_vector")},
                              stage_rows=[row], notes=result.scale_warnings() or None)
    logits_of = EvalLogits(lm, parity.dataset, parity.trials, result.function_vector, edit_layer)
    gate.check(parity.comparable(parity_model), guard_failures=failures,
               adjust=lambda ours, ref: resolve_rank_ties(ours, ref, logits_of))


@pytest.mark.fvkit_check("sweep")
def test_layer_sweep(parity, parity_model, lm, gate_context):
    gate = Gate("M4", gate_context, label="layer sweep", keys=(SWEEP_KEY,))
    gate.prepare()
    sweep = parity.layer_sweep(parity_model)
    guard = [f"layer sweep injection guard: the vector at layer {layer} changed no {stage} logit"
             for stage, st in sweep["stages"].items() for layer, change in enumerate(st["max_abs_logit_change"])
             if not change > MIN_INJECTION_LOGIT_CHANGE]
    gate_context.recorder.add(
        metrics={"layer_sweep": {"method": sweep["method"], "best_layer": sweep["best_layer"],
                                 "near_tie_reruns": sum(st["near_tie_reruns"] for st in sweep["stages"].values()),
                                 "seconds": sweep["seconds"]}},
        timings={"layer_sweep": sweep["seconds"]})
    fv = parity.pipeline(parity_model).function_vector
    gate.check(sweep_comparable(sweep), guard_failures=guard, vector=fv,
               adjust=lambda ours, ref: resolve_sweep_ties(
                   ours, ref, lambda layer: EvalLogits(lm, parity.dataset, parity.trials, fv, layer)))
