"""The settings a run uses when none are given: ``fvkit run``, ``fvkit trials`` and the parity gates.

    trials = FixedTrials.make(ds, DEFAULT_N_TRIALS, DEFAULT_N_SHOTS, DEFAULT_SEED)
    layer = default_edit_layer(lm.dims.n_layers)

They are the reference's own defaults (the paper's 10 trials of 10-shot prompts,
seed 0, the 10 heads with the largest mean effect, injection at the middle layer),
so a run with no options is comparable with the reference as it is. This module
imports nothing, so command-line parsers and the pytest plugin read it without
loading torch.
"""

from __future__ import annotations

#: The task every run uses when none is given. present-past, because the real models
#: of the zoo (SmolLM2-135M) do it in context (clean 10-shot top-1 well above 0.5), so
#: their reference numbers carry signal; the random tiny models do no task at all.
DEFAULT_DATASET = "present-past"
DEFAULT_N_TRIALS = 10
DEFAULT_N_SHOTS = 10
DEFAULT_SEED = 0
DEFAULT_N_TOP_HEADS = 10

#: ``--ie-mode`` values: how each trial's indirect effects are computed (the table
#: of strategies is :data:`fvkit.pipeline.IE_STRATEGIES`). Both give the same numbers
#: to float32 rounding; ``fast`` recomputes only the last token.
IE_MODES = ("fast", "exact")
DEFAULT_IE_MODE = "fast"

#: How the evaluations run (fvkit.fast.run_evaluations), and what a rank read within
#: float noise of a tie becomes (fvkit.fast.evaluation).
EVAL_METHODS = ("cached", "exact", "batched")
DEFAULT_EVAL_METHOD = "cached"
TIE_POLICIES = ("rerun", "report")
#: Prompts per pass of the batched evaluation (fvkit.fast.batched).
DEFAULT_EVAL_BATCH_SIZE = 16

#: How the default edit layer is described in help texts.
DEFAULT_EDIT_LAYER_TEXT = "n_layers // 2"


def default_edit_layer(n_layers: int) -> int:
    """The layer the function vector is added at when none is given: the middle one."""
    return n_layers // 2
