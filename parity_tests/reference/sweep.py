"""The layer sweep: the loop of the reference's ``evaluate_function_vector.py --edit_layer -1``.

For each layer 0..n_layers-1, ``set_seed(seed)`` then the zero-shot evaluation
with the vector at that layer, ``set_seed(seed)`` then the shuffled-label one
(each evaluation reseeds, see :meth:`.stages.StageRunner.evaluation`).
"""

from __future__ import annotations

from .keys import SWEEP_STAGES
from .stages import StageRunner


def layer_sweep(runner: StageRunner) -> dict:
    """``{stage: [evaluation per layer]}`` for the sweep stages, layers in order."""
    evaluations = {"zero_shot": runner.zero_shot, "shuffled": runner.shuffled}
    out = {stage: [] for stage in SWEEP_STAGES}
    for layer in range(int(runner.model_config["n_layers"])):
        for stage in SWEEP_STAGES:
            out[stage].append(evaluations[stage](layer))
    return out
