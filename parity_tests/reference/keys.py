"""The result keys the runner fills, read from fvkit's own gate definitions.

The runner returns the layout of ``fvkit.pipeline.PipelineResult.comparable()``,
and the gates read it by these names; taking them from fvkit (this module is the
only place that imports them) keeps both sides spelled the same.
"""

from fvkit.method.fixed_trials import STAGES as PROMPT_STAGES
from fvkit.parity.registry import GATE_DEFS, GATES, PIPELINE_RESULT_KEYS, SWEEP_KEY, SWEEP_STAGES, gate_def

#: The M1 gate's key: prompts, token data and split, as one sub-dict.
M1_KEY = gate_def("M1").result_keys[0]
#: Result keys of the numeric stages, in pipeline order (the M2, M3 and M4 keys).
RESULT_STAGES = tuple(key for key in PIPELINE_RESULT_KEYS if key != M1_KEY)
#: The gate whose intervention numbers are void when the reference's injection does
#: nothing; ``meta["invalid"]`` is keyed by its ``reference_invalid_key``.
INJECTION_GATE = next(g.name for g in GATE_DEFS if g.reference_invalid_key)
INVALID_KEY = gate_def(INJECTION_GATE).reference_invalid_key
#: What each result key needs first; an unsupported stage makes its dependants unsupported.
#: Listed in pipeline order, so one pass over it propagates a root cause to every dependant.
STAGE_NEEDS = {
    "indirect_effect": ("mean_activations",),
    "top_heads": ("indirect_effect",),
    "function_vector": ("mean_activations", "top_heads"),
    "zero_shot": ("function_vector",),
    "shuffled": ("function_vector",),
}

__all__ = ["GATES", "INJECTION_GATE", "INVALID_KEY", "M1_KEY", "PROMPT_STAGES", "RESULT_STAGES", "STAGE_NEEDS",
           "SWEEP_KEY", "SWEEP_STAGES"]
