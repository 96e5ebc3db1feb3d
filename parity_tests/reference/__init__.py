"""The reference runner: the paper's own stage functions on fvkit's loaded model.

    lm = load_model("tiny-llama")                                  # fvkit.models.loader
    trials = FixedTrials.load("datasets/fixed_trials/....json")
    result = run_reference(lm, "datasets/antonym.json", trials,
                           reference_src="/path/to/function_vectors", baukit="/path/to/baukit",
                           n_top_heads=10, edit_layer=1, max_trials=4)
    result["indirect_effect"]            # (T, L, H) nested floats
    result["meta"]["invalid"]["m4"]      # why the reference's intervention numbers are void, or None

or from a shell (repository root):

    python -m parity_tests.reference --model tiny-llama --dataset datasets/antonym.json \\
        --fixed-trials F.json --reference-src /path/to/function_vectors --baukit /path/to/baukit \\
        --max-trials 4 --n-top-heads 10 --edit-layer 1 --out result.json

Nothing of the reference is part of this repository: its ``src/`` folder and
baukit are imported at run time from the paths given. The runner calls each
reference stage right after the reference's ``set_seed(seed)``, exactly as its
scripts do, so the reference draws the prompts written down in the fixed-trials
file. What the reference cannot be given directly (its model loader only knows
hub names) is bridged in :mod:`.config` and nowhere else, and every such bridge
is recorded as a sentence in ``meta["normalizations"]``. Stages the reference
cannot compute faithfully for a model are listed in ``meta["unsupported"]`` with
the reason and left as ``None``; intervention numbers the reference computes
without actually intervening (transformers releases whose decoder blocks return a
plain tensor) are kept but flagged in ``meta["invalid"]["m4"]``.

The parts:

* :mod:`.loading` imports the reference and baukit; :mod:`.isolation` keeps their
  side effects (RNG state, warnings) out of the calling process;
* :mod:`.config` builds the reference's ``MODEL_CONFIG`` (its branch picked by
  module layout from ``fvkit.models.architectures.reference_branches()``) and says
  which stages it supports;
* :mod:`.recording` records the prompts, token data and split the reference built;
  :mod:`.dataset` lays the dataset out for it and reads the split back;
* :mod:`.stages` calls each stage, :mod:`.sweep` the layer sweep,
  :mod:`.injection` checks whether the reference's intervention does anything;
* :mod:`.run` runs it all, :mod:`.meta` records provenance, :mod:`.cli` is the
  command line; :mod:`.keys` holds the result key names, read from fvkit's gates.

The result has the layout of ``fvkit.pipeline.PipelineResult.comparable()`` (see
``docs/reference_runner.md``).
"""

from .cli import build_parser, main
from .config import (
    NO_BRANCH_NAME,
    REFERENCE_BOS_TEXT,
    ReferenceConfig,
    propagate_unsupported,
    reference_model_config,
)
from .dataset import reference_split, split_from_calls, split_row_mismatches
from .injection import probe_injection
from .keys import PROMPT_STAGES, RESULT_STAGES, STAGE_NEEDS
from .loading import (
    REFERENCE_MARKER,
    REFERENCE_TOP_MODULES,
    ReferenceModules,
    StubbedAttributeError,
    baukit_package_dir,
    load_reference,
    reference_src_dir,
)
from .meta import checkout_state
from .run import run_reference, run_reference_tensors, to_plain
from .stages import ReferenceStageError

__all__ = [
    "NO_BRANCH_NAME", "PROMPT_STAGES", "REFERENCE_BOS_TEXT", "REFERENCE_MARKER",
    "REFERENCE_TOP_MODULES", "RESULT_STAGES", "STAGE_NEEDS", "ReferenceConfig", "ReferenceModules",
    "ReferenceStageError", "StubbedAttributeError", "baukit_package_dir", "build_parser", "checkout_state",
    "load_reference", "main", "probe_injection", "propagate_unsupported", "reference_model_config",
    "reference_split", "reference_src_dir", "run_reference", "run_reference_tensors", "split_from_calls",
    "split_row_mismatches", "to_plain",
]
