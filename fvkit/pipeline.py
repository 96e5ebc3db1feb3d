"""All stages on one model, the code behind ``fvkit run`` and the parity gates.

    lm = load_model("tiny-gpt2")
    ds = load_task_dataset("antonym")
    trials = FixedTrials.load("datasets/fixed_trials/fixed_trials_antonym_t10_s10_seed0.json", ds)
    result = run_pipeline(lm, ds, trials, n_top_heads=10, edit_layer=1)
    write_run_outputs(result, "results_fv/run")
"""

from __future__ import annotations

import io
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fvkit import __version__

from fvkit.models import adapters
from fvkit.method.activations import mean_head_activations
from fvkit.errors import DataError, FvkitError
from fvkit.method.block_vector import block_written_vector
from fvkit.method.function_vector import compute_function_vector, select_top_heads
from fvkit.method.vector_scale import negligible_text, residual_norms, vector_scale, warn_if_negligible
from fvkit.fast.indirect_effect import fast_trial
from fvkit.method.indirect_effect import exact_trial, indirect_effects as effects_over_trials
from fvkit.fast.run_evaluations import run_baseline, run_evaluations
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.stage_inputs import n_used, trial_prompt
from fvkit.method.token_labels import dummy_token_labels, slot_index_map, token_meta_labels
from fvkit.method.fixed_trials import STAGES
from fvkit.method.run_defaults import (DEFAULT_EVAL_BATCH_SIZE, DEFAULT_EVAL_METHOD, DEFAULT_IE_MODE, DEFAULT_N_TOP_HEADS,
                                       IE_MODES, default_edit_layer)
from fvkit.method.prompt_length import check_prompt_lengths
from fvkit import run_dir
from fvkit.parity.registry import PIPELINE_RESULT_KEYS

#: Files a complete run directory holds; a run is written to a staging folder
#: and swapped into place whole (:mod:`fvkit.run_dir`), so a crash never leaves a partial set.
RUN_FILES = (
    "mean_activations.pt", "indirect_effect.pt", "function_vector.pt", "top_heads.json",
    "eval_zero_shot.json", "eval_shuffled.json", "eval_baseline.json", "token_labels.json",
    "timings.json", "run.json",
)
#: Files a run adds next to its stage files (:mod:`fvkit.report.run_files`); the
#: sweep ones only with ``--edit-layer all``.
ARTIFACT_FILES = ("cie_heatmap.png", "decoded_tokens.json", "report.html")
SWEEP_FILES = ("layer_sweep.json", "layer_sweep.png")
#: Files of the vector as the block writes it (:mod:`fvkit.method.block_vector`), only
#: where the spec declares an attention-output norm.
BLOCK_WRITTEN_FILES = ("block_written_vector.pt", "eval_block_written.json")
#: Every name a run directory may hold: anything else is the user's, and a
#: directory holding it is never replaced.
KNOWN_RUN_FILES = RUN_FILES + ARTIFACT_FILES + SWEEP_FILES + BLOCK_WRITTEN_FILES
#: How reports name the two vectors.
REFERENCE_VECTOR = "the reference-defined function vector"
BLOCK_WRITTEN_VECTOR = "the function vector as the block writes it"


#: ``--ie-mode`` -> the function computing one trial's (n_layers, n_heads) effects.
#: Kept here, above both strategies, so that neither imports the other.
IE_STRATEGIES = {"exact": exact_trial, "fast": fast_trial}


def indirect_effects(lm, dataset, trials, mean_acts: torch.Tensor, template: Template = DEFAULT_TEMPLATE,
                     max_trials: Optional[int] = None, mode: str = "exact", show_progress: bool = True) -> torch.Tensor:
    """(n_trials, n_layers, n_heads) indirect effects, each trial computed by the ``mode`` strategy."""
    if mode not in IE_STRATEGIES:
        raise FvkitError(f"unknown indirect-effect mode '{mode}'; use one of {', '.join(IE_MODES)}")
    return effects_over_trials(lm, dataset, trials, mean_acts, template, max_trials=max_trials,
                               trial=IE_STRATEGIES[mode], desc=f"indirect effect ({mode})",
                               show_progress=show_progress)


@dataclass
class PipelineResult:
    model: str
    spec: str
    trials_id: str
    settings: dict
    prompts: dict
    token_labels: list
    token_ids: list
    dummy_labels: list
    idx_map: dict
    #: {label: (first, last)}: the multi-token demonstration words averaged into one slot.
    idx_avg: dict
    mean_activations: torch.Tensor
    indirect_effect: torch.Tensor
    top_heads: list
    function_vector: torch.Tensor
    zero_shot: dict
    shuffled: dict
    baseline: dict
    timings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)
    #: How the evaluations ran (method, near ties, re-runs); see fvkit.fast.run_evaluations.
    evaluation: dict = field(default_factory=dict)
    #: The layer sweep, when the run computed it with its evaluations (``sweep=True``).
    sweep: Optional[dict] = None
    #: "function_vector" (and "block_written_vector" when built) -> the vector's norm
    #: against the residual stream at the edit layer (:func:`fvkit.method.vector_scale.vector_scale`).
    vector_scale: dict = field(default_factory=dict)
    #: The vector as the block writes it and its evaluations, or None (the spec declares no
    #: attention-output norm, or the run did not ask for it). Never part of ``comparable()``.
    block_written: Optional[dict] = None

    def scale_warnings(self) -> list:
        """One line per vector below MIN_VECTOR_TO_RESIDUAL of the residual stream."""
        names = {"function_vector": REFERENCE_VECTOR, "block_written_vector": BLOCK_WRITTEN_VECTOR}
        return [negligible_text(scale, names.get(key, key)) for key, scale in self.vector_scale.items()
                if scale.get("negligible")]

    def comparable(self) -> dict:
        """The layout the reference runner returns, with plain Python numbers: ``meta`` and
        every key of the gate registry's PIPELINE_RESULT_KEYS, in that order."""
        values = {
            "m1": {
                "prompts": self.prompts,
                "token_labels": [list(x) for x in self.token_labels],
                "token_ids": list(self.token_ids),
                "dummy_labels": [list(x) for x in self.dummy_labels],
                "idx_map": {str(k): v for k, v in self.idx_map.items()},
                "idx_avg": {str(k): [int(a), int(b)] for k, (a, b) in self.idx_avg.items()},
            },
            "mean_activations": self.mean_activations.tolist(),
            "indirect_effect": self.indirect_effect.tolist(),
            "top_heads": self.top_heads,
            "function_vector": self.function_vector.tolist(),
            "zero_shot": self.zero_shot,
            "shuffled": self.shuffled,
            "baseline": self.baseline,
        }
        return {"meta": {"settings": self.settings, "trials_id": self.trials_id},
                **{key: values[key] for key in PIPELINE_RESULT_KEYS}}


def stage_prompts(lm, dataset, trials, max_trials, template: Template) -> dict:
    """Prompt strings each stage uses (trial stages capped at ``max_trials``)."""
    out = {}
    for stage in STAGES:
        cap = max_trials if stage in ("mean_activations", "indirect_effect") else None
        out[stage] = [trial_prompt(lm, dataset, trials, stage, i, template)[1]
                      for i in range(n_used(trials.n_items(stage), cap))]
    return out


def check_max_trials(trials, max_trials: Optional[int]) -> None:
    """``--max-trials`` must select trials the file has: capping silently would run fewer than asked."""
    if max_trials is None:
        return
    if max_trials < 1:
        raise DataError(f"--max-trials must be at least 1, got {max_trials}")
    if max_trials > trials.n_trials:
        raise DataError(f"--max-trials {max_trials} is more than the {trials.n_trials} trials of {trials.id}; "
                        f"pass --max-trials {trials.n_trials} or fewer, or a trials file with more trials")


def check_run_settings(lm, dataset, trials, *, n_top_heads: int, edit_layer: Optional[int],
                       max_trials: Optional[int], template: Template = DEFAULT_TEMPLATE) -> int:
    """Every setting against the loaded model, before any forward pass; returns the edit layer."""
    trials.check_dataset(dataset)
    check_max_trials(trials, max_trials)
    edit_layer = default_edit_layer(lm.dims.n_layers) if edit_layer is None else edit_layer
    adapters.check_layer(lm.model, lm.spec, edit_layer)
    total_heads = lm.dims.n_layers * lm.dims.n_heads
    if not 1 <= n_top_heads <= total_heads:
        raise FvkitError(f"--n-top-heads {n_top_heads} is outside 1..{total_heads} (this model has {total_heads} heads)")
    check_prompt_lengths(lm, dataset, trials, max_trials, template)
    return edit_layer


def run_pipeline(lm, dataset, trials, *, n_top_heads: int = DEFAULT_N_TOP_HEADS,
                 edit_layer: Optional[int] = None, max_trials: Optional[int] = None, ie_mode: str = DEFAULT_IE_MODE,
                 template: Template = DEFAULT_TEMPLATE, show_progress: bool = True, sweep: bool = False,
                 eval_method: str = DEFAULT_EVAL_METHOD, eval_ties: str = "rerun",
                 eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE, block_written: bool = False) -> PipelineResult:
    """Every stage; ``sweep`` adds the layer sweep, read from the evaluations' own passes
    (``eval_method``/``eval_ties``: see :mod:`fvkit.fast.run_evaluations`); ``block_written``
    also builds and evaluates the vector as the block writes it where the spec declares an
    attention-output norm (``fvkit run`` does, the parity gates do not)."""
    edit_layer = check_run_settings(lm, dataset, trials, n_top_heads=n_top_heads, edit_layer=edit_layer,
                                    max_trials=max_trials, template=template)
    timings = {}

    def timed(name, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        timings[name] = round(time.perf_counter() - start, 4)
        return value

    tok = lm.tokenizer
    data, _ = trial_prompt(lm, dataset, trials, "mean_activations", 0, template)
    labels, text = token_meta_labels(data, tok, lm.spec.prepend_bos)
    dummy = dummy_token_labels(trials.n_shots, tok, lm.spec.prepend_bos, lm.spec.bos_text, template)
    idx_map, idx_avg = slot_index_map(labels, dummy)
    prompts = stage_prompts(lm, dataset, trials, max_trials, template)

    mean_acts = timed("mean_activations", mean_head_activations, lm, dataset, trials, template,
                      max_trials=max_trials, show_progress=show_progress)
    ie = timed("indirect_effect", indirect_effects, lm, dataset, trials, mean_acts, template,
               max_trials=max_trials, mode=ie_mode, show_progress=show_progress)
    start = time.perf_counter()
    heads = select_top_heads(ie, n_top_heads)
    fv = compute_function_vector(lm, mean_acts, heads)
    timings["function_vector"] = round(time.perf_counter() - start, 4)
    evals = run_evaluations(lm, dataset, trials, fv, edit_layer, template, sweep=sweep, method=eval_method,
                            ties=eval_ties, batch_size=eval_batch_size, show_progress=show_progress)
    timings.update(evals.timings)
    zs, sh = evals.zero_shot, evals.shuffled
    base, base_info = timed("eval_baseline", run_baseline, lm, dataset, trials, fv, edit_layer, template,
                            method=eval_method, ties=eval_ties, show_progress=show_progress)
    norms = evals.residual_norms  # read from the evaluation's own clean passes when it cached them
    if norms is None:
        norms = timed("residual_norm", residual_norms, lm, dataset, trials, edit_layer, template)
    scales = {"function_vector": vector_scale(fv, norms, edit_layer)}
    warn_if_negligible(scales["function_vector"], REFERENCE_VECTOR)
    written = None
    if block_written and lm.spec.attn_output_norm is not None:
        start = time.perf_counter()
        fv_block = block_written_vector(lm, mean_acts, heads)
        timings["block_written_vector"] = round(time.perf_counter() - start, 4)
        scales["block_written_vector"] = vector_scale(fv_block, norms, edit_layer)
        warn_if_negligible(scales["block_written_vector"], BLOCK_WRITTEN_VECTOR)
        written = {"attn_output_norm": lm.spec.attn_output_norm, "vector": fv_block}
        block_evals = run_evaluations(lm, dataset, trials, fv_block, edit_layer, template, method=eval_method,
                                      ties=eval_ties, batch_size=eval_batch_size, show_progress=show_progress)
        timings.update({f"{k}_block_written": v for k, v in block_evals.timings.items()})
        written.update(zero_shot=block_evals.zero_shot, shuffled=block_evals.shuffled)
    settings = {"n_top_heads": n_top_heads, "edit_layer": edit_layer, "max_trials": max_trials,
                "n_trials_used": n_used(trials.n_trials, max_trials), "n_shots": trials.n_shots,
                "seed": trials.seed, "ie_mode": ie_mode, "template": template.as_dict()}
    return PipelineResult(
        model=lm.name, spec=lm.spec.name, trials_id=trials.id, settings=settings, prompts=prompts,
        token_labels=labels, token_ids=tok(text).input_ids, dummy_labels=dummy, idx_map=idx_map, idx_avg=idx_avg,
        mean_activations=mean_acts, indirect_effect=ie, top_heads=heads, function_vector=fv,
        zero_shot=zs, shuffled=sh, baseline=base, timings=timings, diagnostics=lm.diagnostics(),
        evaluation={**evals.info, "baseline": base_info}, sweep=evals.sweep,
        vector_scale=scales, block_written=written,
    )


def package_versions() -> dict:
    import numpy
    import transformers
    return {"fvkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def json_text(obj) -> str:
    """How every JSON file of a run directory is written."""
    return json.dumps(obj, indent=1, default=str) + "\n"


def _tensor_bytes(tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(tensor, buf)
    return buf.getvalue()


def run_files(result: PipelineResult, extra_args: Optional[dict] = None) -> dict:
    """File name -> bytes of the stage files of a run (``run.json`` among them)."""
    text = lambda obj: json_text(obj).encode("utf-8")
    files = {
        "mean_activations.pt": _tensor_bytes(result.mean_activations),
        "indirect_effect.pt": _tensor_bytes(result.indirect_effect),
        "function_vector.pt": _tensor_bytes(result.function_vector),
        "top_heads.json": text(result.top_heads),
        "eval_zero_shot.json": text(result.zero_shot),
        "eval_shuffled.json": text(result.shuffled),
        "eval_baseline.json": text(result.baseline),
        "token_labels.json": text({"prompt": result.prompts["mean_activations"][0],
                                   "token_ids": result.token_ids,
                                   "token_labels": [list(x) for x in result.token_labels],
                                   "dummy_labels": [list(x) for x in result.dummy_labels]}),
        "timings.json": text(result.timings),
        "run.json": text({"arguments": extra_args or {}, "model": result.model, "spec": result.spec,
                          "trials_id": result.trials_id, "settings": result.settings,
                          "diagnostics": result.diagnostics, "evaluation": result.evaluation,
                          "vector_scale": result.vector_scale, "warnings": result.scale_warnings(),
                          **({"block_written_vector": block_written_summary(result)} if result.block_written else {}),
                          "versions": package_versions()}),
    }
    if result.block_written:
        files["block_written_vector.pt"] = _tensor_bytes(result.block_written["vector"])
        files["eval_block_written.json"] = text({stage: result.block_written[stage]
                                                 for stage in ("zero_shot", "shuffled")})
    return files


def top1_lift(evaluation: dict) -> dict:
    """Top-1 accuracy without and with a vector, and the difference."""
    clean, edited = evaluation["clean_topk"][0][1], evaluation["intervention_topk"][0][1]
    return {"top1_no_vector": clean, "top1_with_vector": edited, "lift": edited - clean}


def block_written_summary(result: PipelineResult) -> dict:
    """run.json's account of both vectors: how each was built and what each did, side by side."""
    written = result.block_written
    return {
        "about": ("per layer, the top heads' out-projection output passed through the block's own "
                  f"attention-output norm ({written['attn_output_norm']}), summed over layers; evaluated "
                  "beside the reference-defined vector, never part of a parity comparison"),
        "attn_output_norm": written["attn_output_norm"],
        "zero_shot": {"function_vector": top1_lift(result.zero_shot),
                      "block_written_vector": top1_lift(written["zero_shot"])},
        "shuffled": {"function_vector": top1_lift(result.shuffled),
                     "block_written_vector": top1_lift(written["shuffled"])},
    }


def check_run_dir(out_dir) -> None:
    """Before any work: ``out_dir`` can be written and holds nothing but an earlier run."""
    from fvkit.output_location import check_output_dir

    check_output_dir(out_dir, "--out")
    run_dir.check_replaceable(out_dir, KNOWN_RUN_FILES, "--out")


def write_run_outputs(result: PipelineResult, out_dir, extra_args: Optional[dict] = None,
                      extra_files: Optional[dict] = None) -> Path:
    """Write every stage file; the directory is the old complete run or the new one, never a mix.

    ``extra_files`` maps further file names to their bytes (figures, the HTML page,
    the layer sweep: see :mod:`fvkit.report.run_files`); they are part of the same swap.
    A directory holding files a run did not write is refused, never replaced.
    """
    out_dir = Path(out_dir)
    check_run_dir(out_dir)
    files = run_files(result, extra_args)
    for name, data in (extra_files or {}).items():
        if name in files:
            raise ValueError(f"extra file {name} would overwrite a stage file")
        files[name] = data
    return run_dir.publish(out_dir, files)
