"""The settings of one reference run, checked before anything is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fvkit.errors import DataError, FvkitError, SpecError

#: What a trials object must provide (fvkit.method.fixed_trials.FixedTrials does).
TRIALS_FIELDS = ("seed", "n_shots", "n_trials", "test_size")


@dataclass(frozen=True)
class RunSettings:
    """One run's numbers: ``k`` is how many trials mean_activations and indirect_effect use."""

    seed: int
    n_shots: int
    test_size: float
    k: int
    max_trials: Optional[int]
    n_top_heads: int
    edit_layer: int
    sweep: bool


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_settings(lm, trials, n_top_heads, edit_layer, max_trials, sweep: bool = False) -> RunSettings:
    """The run's settings, or one clear error naming the setting and its valid range."""
    for attr in TRIALS_FIELDS:
        if not hasattr(trials, attr):
            raise DataError(f"trials object {type(trials).__name__} has no '{attr}'; pass a fvkit FixedTrials")
    n_layers, n_heads = int(lm.dims.n_layers), int(lm.dims.n_heads)
    if not _is_int(edit_layer) or not 0 <= edit_layer < n_layers:
        raise SpecError(f"edit_layer {edit_layer} is out of range for this model: valid layers are 0..{n_layers - 1}")
    if not _is_int(n_top_heads) or not 1 <= n_top_heads <= n_layers * n_heads:
        raise FvkitError(f"n_top_heads must be between 1 and {n_layers * n_heads} (layers x heads), got {n_top_heads}")
    k = trials.n_trials if max_trials is None else max_trials
    if not _is_int(k) or not 1 <= k <= trials.n_trials:
        raise FvkitError(f"max_trials must be between 1 and the {trials.n_trials} trials of the fixed-trials "
                         f"file, got {max_trials}")
    return RunSettings(seed=int(trials.seed), n_shots=int(trials.n_shots), test_size=float(trials.test_size), k=k,
                       max_trials=max_trials, n_top_heads=n_top_heads, edit_layer=edit_layer, sweep=sweep)
