"""A whole reference run: settings checked, stages called in pipeline order, result assembled."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .config import reference_model_config
from .dataset import dataset_file, link_dataset, split_from_calls, split_warnings
from .injection import invalid_reason, probe_zero_shot
from .isolation import process_state_kept, reference_warnings_hidden
from .keys import INVALID_KEY, M1_KEY, SWEEP_KEY
from .loading import load_reference
from .meta import build_meta, run_settings
from .recording import Recorder, install_recorders
from .settings import check_settings
from .stages import TIMING_DIGITS, StageRunner
from .sweep import layer_sweep


def _bos_warnings(lm, model_config: dict) -> list:
    """A spec that says the tokenizer adds BOS when it does not shifts every reference label."""
    if not model_config["prepend_bos"]:
        return []
    ids = lm.tokenizer("a").input_ids
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    if bos is None or not ids or ids[0] != bos:
        return [f"spec '{lm.spec.name}' says the tokenizer adds BOS (prepend_bos=True) but "
                f"tokenizer('a') gives {ids}; the reference's token labels will be shifted by one"]
    return []


def _run_stages(sr: StageRunner, root: str, name: str, invalid: dict) -> Optional[dict]:
    """Every supported stage in pipeline order; returns the injection probe (or None)."""
    sr.load_dataset(root, name)
    sr.run("mean_activations", "mean_activations", sr.mean_activations)
    sr.run("indirect_effect", "indirect_effect", sr.indirect_effect)
    sr.run("top_heads", None, sr.top_heads)
    if sr.out["top_heads"] is not None and "function_vector" not in sr.unsupported:
        sr.out["function_vector"] = sr.fv
    probe = None
    if sr.out["function_vector"] is not None:
        probe = probe_zero_shot(sr.refs, sr.lm, sr.model_config, sr.out["function_vector"], sr.settings.edit_layer,
                                sr.ds["test"][0], sr.prefixes, sr.separators)
        invalid[INVALID_KEY] = invalid_reason(probe)
    sr.run("zero_shot", "zero_shot", sr.zero_shot)
    sr.run("shuffled", "shuffled", sr.shuffled)
    sr.run("baseline", "baseline", sr.baseline)
    if sr.settings.sweep and sr.out["function_vector"] is not None:
        sr.run(SWEEP_KEY, None, lambda: layer_sweep(sr))
    return probe


def _dataset_note(path: Path) -> str:
    return (f"dataset file {path} is symlinked as <tmp>/abstractive/{path.stem}.json for the reference's "
            f"load_dataset(root_data_dir=<tmp>)")


def run_reference_tensors(lm, dataset_path, trials, *, reference_src, baukit=None, n_top_heads: int,
                          edit_layer: int, max_trials: Optional[int] = None, progress: bool = False,
                          sweep: bool = False) -> dict:
    """Like :func:`run_reference`, but tensors stay tensors and idx_map keys stay ints."""
    settings = check_settings(lm, trials, n_top_heads, edit_layer, max_trials, sweep)
    path = dataset_file(dataset_path, trials)
    refs = load_reference(reference_src, baukit)
    cfg = reference_model_config(lm)
    unsupported = dict(cfg.unsupported)
    notes = list(refs.normalizations) + list(cfg.normalizations) + [_dataset_note(path)]
    warning_notes = _bos_warnings(lm, cfg.model_config)
    invalid = {INVALID_KEY: None}
    probe = None
    rec = Recorder()
    sr = StageRunner(refs, lm, cfg.model_config, settings, unsupported, rec)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fvkit-ref-data-") as root, contextlib.ExitStack() as stack:
        link_dataset(path, Path(root))
        stack.enter_context(process_state_kept())
        stack.enter_context(torch.set_grad_enabled(False))
        stack.enter_context(reference_warnings_hidden())
        install_recorders(stack, refs, rec, progress)
        if M1_KEY not in unsupported:
            probe = _run_stages(sr, root, path.stem, invalid)

    split = split_from_calls(rec.split_calls)
    warning_notes += split_warnings(sr.ds, path, rec, split)
    if M1_KEY not in unsupported and "mean_activations" in unsupported:
        unsupported[M1_KEY] = ("token labels, dummy labels and idx_map come from the first mean_activations "
                               "prompt, and that stage is unsupported: " + cfg.unsupported["mean_activations"])
    m1 = rec.m1(lm.tokenizer, split)
    sr.timings["total"] = round(time.perf_counter() - t_all, TIMING_DIGITS)
    meta = build_meta(refs, lm, cfg, run_settings(lm, trials, path, settings), normalizations=notes,
                      recorded_in=rec.patched, unsupported=unsupported, invalid=invalid, injection_probe=probe,
                      warnings=warning_notes, timings=sr.timings)
    return {"meta": meta, M1_KEY: m1, **sr.out}


def to_plain(value: Any) -> Any:
    """Tensors to nested Python floats, numpy scalars to Python numbers, tuples to
    lists and dict keys to strings: the form snapshots store."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def run_reference(lm, dataset_path, trials, *, reference_src, baukit=None, n_top_heads: int, edit_layer: int,
                  max_trials: Optional[int] = None, progress: bool = False, sweep: bool = False) -> dict:
    """Run the reference's stages on ``lm`` with the draws of ``trials``; the comparable result dict.

    ``lm`` is a ``fvkit.models.loader.LoadedModel`` (model, tokenizer, spec, dims, name);
    ``trials`` a ``fvkit.method.fixed_trials.FixedTrials`` (seed, n_shots, n_trials, test_size);
    ``dataset_path`` the JSON file the trials were drawn from (or a TaskDataset).
    ``max_trials`` limits mean_activations and indirect_effect to their first K trials;
    evaluations use every test item. ``sweep`` also evaluates zero-shot and
    shuffled-label with the vector at every layer, as the reference's
    ``--edit_layer -1`` does (``result["layer_sweep"][stage][layer]``). All numbers
    are plain Python floats.
    """
    return to_plain(run_reference_tensors(lm, dataset_path, trials, reference_src=reference_src, baukit=baukit,
                                          n_top_heads=n_top_heads, edit_layer=edit_layer, max_trials=max_trials,
                                          progress=progress, sweep=sweep))
