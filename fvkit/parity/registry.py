"""The parity gates by name, in order, with their titles.

    from fvkit.parity.registry import GATES, GATE_TITLES   # ("M1", ..., "M5"), {"M1": "prompts", ...}

Kept apart from :mod:`fvkit.parity.compare` (which needs torch) because the
pytest plugin imports it at start-up, in every pytest run of an environment
with fvkit installed.
"""

GATES = ("M1", "M2", "M3", "M4", "M5")
GATE_TITLES = {
    "M1": "prompts",
    "M2": "mean_activations",
    "M3": "indirect_effect",
    "M4": "function_vector",
    "M5": "spec_resolution",
}
