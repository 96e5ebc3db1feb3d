"""All stages on one model, the code behind ``fvkit run`` and the parity gates.

    lm = load_model("tiny-gpt2")
    ds = load_task_dataset("antonym")
    trials = FixedTrials.load("datasets/fixed_trials/fixed_trials_antonym_t10_s10_seed0.json", ds)
    result = run_pipeline(lm, ds, trials, n_top_heads=10, edit_layer=1)
    write_run_outputs(result, "results_fv/run")
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fvkit import __version__

from fvkit.models import adapters
from fvkit.method.activations import mean_head_activations
from fvkit.errors import FvkitError
from fvkit.method.function_vector import compute_function_vector, select_top_heads
from fvkit.method.indirect_effect import indirect_effects
from fvkit.method.intervene import evaluate, evaluate_baseline
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.stage_inputs import n_used, trial_prompt
from fvkit.method.token_labels import dummy_token_labels, slot_index_map, token_meta_labels
from fvkit.method.fixed_trials import STAGES

#: Files a complete run directory holds; a run is written to a temporary
#: directory and moved into place whole, so a crash never leaves a partial set.
RUN_FILES = (
    "mean_activations.pt", "indirect_effect.pt", "function_vector.pt", "top_heads.json",
    "eval_zero_shot.json", "eval_shuffled.json", "eval_baseline.json", "token_labels.json",
    "timings.json", "run.json",
)


def default_edit_layer(lm) -> int:
    return lm.dims.n_layers // 2


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
    mean_activations: torch.Tensor
    indirect_effect: torch.Tensor
    top_heads: list
    function_vector: torch.Tensor
    zero_shot: dict
    shuffled: dict
    baseline: dict
    timings: dict = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)

    def comparable(self) -> dict:
        """The layout the reference runner returns, with plain Python numbers."""
        return {
            "meta": {"settings": self.settings, "trials_id": self.trials_id},
            "m1": {
                "prompts": self.prompts,
                "token_labels": [list(x) for x in self.token_labels],
                "token_ids": list(self.token_ids),
                "dummy_labels": [list(x) for x in self.dummy_labels],
                "idx_map": {str(k): v for k, v in self.idx_map.items()},
            },
            "mean_activations": self.mean_activations.tolist(),
            "indirect_effect": self.indirect_effect.tolist(),
            "top_heads": self.top_heads,
            "function_vector": self.function_vector.tolist(),
            "zero_shot": self.zero_shot,
            "shuffled": self.shuffled,
            "baseline": self.baseline,
        }


def stage_prompts(lm, dataset, trials, max_trials, template: Template) -> dict:
    """Prompt strings each stage uses (trial stages capped at ``max_trials``)."""
    out = {}
    for stage in STAGES:
        cap = max_trials if stage in ("mean_activations", "indirect_effect") else None
        out[stage] = [trial_prompt(lm, dataset, trials, stage, i, template)[1]
                      for i in range(n_used(trials.n_items(stage), cap))]
    return out


def run_pipeline(lm, dataset, trials, *, n_top_heads: int = 10, edit_layer: Optional[int] = None,
                 max_trials: Optional[int] = None, ie_mode: str = "fast",
                 template: Template = DEFAULT_TEMPLATE, show_progress: bool = True) -> PipelineResult:
    trials.check_dataset(dataset)
    edit_layer = default_edit_layer(lm) if edit_layer is None else edit_layer
    adapters.check_layer(lm.model, lm.spec, edit_layer)
    total_heads = lm.dims.n_layers * lm.dims.n_heads
    if not 1 <= n_top_heads <= total_heads:
        raise FvkitError(f"--n-top-heads {n_top_heads} is outside 1..{total_heads} (this model has {total_heads} heads)")
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
    idx_map, _ = slot_index_map(labels, dummy)
    prompts = stage_prompts(lm, dataset, trials, max_trials, template)

    mean_acts = timed("mean_activations", mean_head_activations, lm, dataset, trials, template,
                      max_trials=max_trials, show_progress=show_progress)
    ie = timed("indirect_effect", indirect_effects, lm, dataset, trials, mean_acts, template,
               max_trials=max_trials, mode=ie_mode, show_progress=show_progress)
    start = time.perf_counter()
    heads = select_top_heads(ie, n_top_heads)
    fv = compute_function_vector(lm, mean_acts, heads)
    timings["function_vector"] = round(time.perf_counter() - start, 4)
    zs = timed("eval_zero_shot", evaluate, lm, dataset, trials, "zero_shot", fv, edit_layer, template,
               show_progress=show_progress)
    sh = timed("eval_shuffled", evaluate, lm, dataset, trials, "shuffled", fv, edit_layer, template,
               show_progress=show_progress)
    base = timed("eval_baseline", evaluate_baseline, lm, dataset, trials, template, show_progress=show_progress)
    settings = {"n_top_heads": n_top_heads, "edit_layer": edit_layer, "max_trials": max_trials,
                "n_trials_used": n_used(trials.n_trials, max_trials), "n_shots": trials.n_shots,
                "seed": trials.seed, "ie_mode": ie_mode, "template": template.as_dict()}
    return PipelineResult(
        model=lm.name, spec=lm.spec.name, trials_id=trials.id, settings=settings, prompts=prompts,
        token_labels=labels, token_ids=tok(text).input_ids, dummy_labels=dummy, idx_map=idx_map,
        mean_activations=mean_acts, indirect_effect=ie, top_heads=heads, function_vector=fv,
        zero_shot=zs, shuffled=sh, baseline=base, timings=timings, diagnostics=lm.diagnostics(),
    )


def package_versions() -> dict:
    import numpy
    import transformers
    return {"fvkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def json_text(obj) -> str:
    """How every JSON file of a run directory is written."""
    return json.dumps(obj, indent=1, default=str) + "\n"


def write_run_outputs(result: PipelineResult, out_dir, extra_args: Optional[dict] = None,
                      extra_files: Optional[dict] = None) -> Path:
    """Write every stage file; the directory appears complete or not at all.

    ``extra_files`` maps further file names to their bytes (figures, the HTML page,
    the layer sweep: see :mod:`fvkit.report.run_files`); they are part of the same move.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "run.json").exists():
        raise FvkitError(f"output directory {out_dir} exists and is not an fvkit run directory; pass a new --out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        torch.save(result.mean_activations, tmp / "mean_activations.pt")
        torch.save(result.indirect_effect, tmp / "indirect_effect.pt")
        torch.save(result.function_vector, tmp / "function_vector.pt")
        dump = lambda name, obj: (tmp / name).write_text(json_text(obj))
        dump("top_heads.json", result.top_heads)
        dump("eval_zero_shot.json", result.zero_shot)
        dump("eval_shuffled.json", result.shuffled)
        dump("eval_baseline.json", result.baseline)
        dump("token_labels.json", {"prompt": result.prompts["mean_activations"][0],
                                   "token_ids": result.token_ids,
                                   "token_labels": [list(x) for x in result.token_labels],
                                   "dummy_labels": [list(x) for x in result.dummy_labels]})
        dump("timings.json", result.timings)
        dump("run.json", {"arguments": extra_args or {}, "model": result.model, "spec": result.spec,
                          "trials_id": result.trials_id, "settings": result.settings,
                          "diagnostics": result.diagnostics, "versions": package_versions()})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
