"""A whole reference run: settings checked, stages called in pipeline order, result assembled."""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from fvkit.errors import FvkitError
from fvkit.parity.injected_vector import INJECTED_KEY, describe_vector

from .config import SUPPLIABLE, reference_model_config
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

#: The stages that evaluate the function vector (and so can evaluate an injected one).
INJECTED_STAGES = ("zero_shot", "shuffled")


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
    if sr.vector is not None:
        probe = probe_zero_shot(sr.refs, sr.lm, sr.eval_config, sr.vector, sr.settings.edit_layer,
                                sr.ds["test"][0], sr.prefixes, sr.separators)
        invalid[INVALID_KEY] = invalid_reason(probe)
    sr.run("zero_shot", "zero_shot", sr.zero_shot)
    sr.run("shuffled", "shuffled", sr.shuffled)
    sr.run("baseline", "baseline", sr.baseline)
    if sr.settings.sweep and sr.vector is not None:
        sr.run(SWEEP_KEY, None, lambda: layer_sweep(sr))
    return probe


def _injected(lm, cfg, injected_vector, sweep: bool):
    """(vector, record) when the reference cannot build its vector but evaluates one it is
    given; (None, None) otherwise. ``injected_vector`` may be a function, called only then."""
    why = cfg.unsupported.get("function_vector")
    evaluated = [k for k in INJECTED_STAGES if k not in cfg.unsupported]
    if injected_vector is None or why is None or not evaluated:
        return None, None
    vector = injected_vector() if callable(injected_vector) else injected_vector
    if vector is None:
        return None, None
    vector = torch.as_tensor(vector).detach().to(torch.float32).cpu()
    hidden = int(lm.dims.hidden_size)
    if vector.numel() != hidden:
        raise FvkitError(f"the injected function vector has {vector.numel()} entries, but model "
                         f"'{getattr(lm, 'name', '?')}' has hidden_size {hidden}; pass fvkit's function vector for "
                         f"this model (shape (1, {hidden}))")
    stages = evaluated + ([SWEEP_KEY] if sweep else [])
    record = describe_vector(vector, why, stages)
    return vector.reshape(1, hidden).to(lm.model.dtype), record


def _dataset_note(path: Path) -> str:
    return (f"dataset file {path} is symlinked as <tmp>/abstractive/{path.stem}.json for the reference's "
            f"load_dataset(root_data_dir=<tmp>)")


def run_reference_tensors(lm, dataset_path, trials, *, reference_src, baukit=None, n_top_heads: int,
                          edit_layer: int, max_trials: Optional[int] = None, progress: bool = False,
                          sweep: bool = False, injected_vector=None) -> dict:
    """Like :func:`run_reference`, but tensors stay tensors and idx_map keys stay ints."""
    settings = check_settings(lm, trials, n_top_heads, edit_layer, max_trials, sweep)
    path = dataset_file(dataset_path, trials)
    refs = load_reference(reference_src, baukit)
    cfg = reference_model_config(lm, supplied=SUPPLIABLE if injected_vector is not None else ())
    vector, injected = _injected(lm, cfg, injected_vector, settings.sweep)
    if injected is None and injected_vector is not None:
        cfg = reference_model_config(lm)   # nothing injected: the evaluations need the reference's own vector
    unsupported = dict(cfg.unsupported)
    notes = list(refs.normalizations) + list(cfg.normalizations) + [_dataset_note(path)]
    if injected is not None:
        notes.append(f"{', '.join(injected['stages'])}: the injected function vector is fvkit's (norm "
                     f"{injected['norm']:.6g}, sha256 {injected['sha256'][:12]}), the evaluation is the reference's "
                     f"own n_shot_eval; the reference cannot build its own vector here")
    warning_notes = _bos_warnings(lm, cfg.model_config)
    invalid = {INVALID_KEY: None}
    probe = None
    rec = Recorder()
    sr = StageRunner(refs, lm, cfg.model_config, settings, unsupported, rec, eval_config=cfg.eval_config,
                     injected_vector=vector)
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
    meta = build_meta(refs, lm, cfg, run_settings(lm, trials, path, settings), normalizations=notes + sr.notes,
                      recorded_in=rec.patched, unsupported=unsupported, invalid=invalid, injection_probe=probe,
                      warnings=warning_notes, timings=sr.timings)
    meta[INJECTED_KEY] = injected
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
                  max_trials: Optional[int] = None, progress: bool = False, sweep: bool = False,
                  injected_vector=None) -> dict:
    """Run the reference's stages on ``lm`` with the draws of ``trials``; the comparable result dict.

    ``lm`` is a ``fvkit.models.loader.LoadedModel`` (model, tokenizer, spec, dims, name);
    ``trials`` a ``fvkit.method.fixed_trials.FixedTrials`` (seed, n_shots, n_trials, test_size);
    ``dataset_path`` the JSON file the trials were drawn from (or a TaskDataset).
    ``max_trials`` limits mean_activations and indirect_effect to their first K trials;
    evaluations use every test item. ``sweep`` also evaluates zero-shot and
    shuffled-label with the vector at every layer, as the reference's
    ``--edit_layer -1`` does (``result["layer_sweep"][stage][layer]``). All numbers
    are plain Python floats.

    ``injected_vector`` (fvkit's function vector for this model, or a function
    returning it, called only when needed) is what the reference's evaluations
    inject where the reference cannot build its own vector (n_heads*head_dim !=
    hidden_size); ``meta["injected_vector"]`` then records it (norm, sha256, values)
    and which stages evaluated it.
    """
    return to_plain(run_reference_tensors(lm, dataset_path, trials, reference_src=reference_src, baukit=baukit,
                                          n_top_heads=n_top_heads, edit_layer=edit_layer, max_trials=max_trials,
                                          progress=progress, sweep=sweep, injected_vector=injected_vector))
