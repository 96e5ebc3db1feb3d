"""One parity session: dataset, fixed trials, models and everything computed once.

    ps = ParitySession.create(options, rootdir)
    ps.trials.id                           # 'fixed_trials_antonym_t10_s10_seed0'
    lm = ps.model("tiny-llama")            # loaded once per session (CPU, fp32)
    result = ps.pipeline("tiny-llama")     # run_pipeline, once per model
    ref = ps.live_reference("tiny-llama")  # the reference runner, once per model (needs --reference-src)

The gates never load or compute anything themselves; they ask the session, so
each model is loaded once and each stage computed once per process, whatever
order pytest runs the gates in.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fvkit.errors import FvkitError
from fvkit.method.run_defaults import (DEFAULT_N_SHOTS, DEFAULT_N_TOP_HEADS, DEFAULT_N_TRIALS, DEFAULT_SEED,
                                       default_edit_layer)
from fvkit.parity.options import GENERATE_TRIALS, ParityOptions
from fvkit.parity.snapshots import settings_key


@dataclass
class ModelInfo:
    """What collection needs to know about a model, read from its config only.

        info = ps.model_info("tiny-llama"); info.id, info.spec, info.n_layers
    """

    name: str
    id: str
    spec: str
    n_layers: int
    n_heads: int


@dataclass
class ModelSettings:
    """The settings a model's gates run with, after defaults and caps.

        s = ps.settings_for("tiny-llama"); s.key, s.edit_layer
    """

    n_trials_used: int
    n_top_heads: int
    edit_layer: int
    key: str
    notes: tuple = ()
    sweep: bool = False
    #: The trials the stages use (None: all of them): --max-trials, else the model's own default.
    max_trials: Optional[int] = None

    def as_dict(self) -> dict:
        out = {"n_trials_used": self.n_trials_used, "n_top_heads": self.n_top_heads,
               "edit_layer": self.edit_layer, "settings_key": self.key}
        if self.sweep:
            out["layer_sweep"] = True
        return out


#: Where syrupy keeps gate M4's snapshots, under the session's root directory.
M4_SNAPSHOT_DIR = Path("parity_tests") / "__snapshots__" / "test_m4_function_vector"


def stored_m4_reference(path: Path) -> Optional[dict]:
    """The reference's M4 numbers in a stored snapshot; None when there is none or it cannot be
    read (the page then shows fvkit's numbers alone; the gate itself reports a bad snapshot)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8")).get("value")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, dict) else None


def model_id(name: str) -> str:
    """The model's name in test ids, snapshot names and the report.

    A local directory is known by its folder name, so an exported copy of a zoo
    model (``fvkit export-model tiny-gpt2 DIR/tiny-gpt2``) meets that model's
    snapshots; a hub id keeps its name with '/' made file-safe.
    """
    text = str(name)
    if os.path.isdir(text) and "/" in text.replace("\\", "/"):
        text = os.path.basename(os.path.normpath(text))
    return re.sub(r"[^\w.+-]", "_", text.replace("/", "__"))


class ParitySession:
    """Shared state of one pytest session of the parity suite (see module docstring)."""

    def __init__(self, options: ParityOptions, rootdir: Path, dataset, trials, trials_source: str, notes: list,
                 reference_runner=None):
        self.options = options
        self.reference_runner = reference_runner
        self.rootdir = Path(rootdir)
        self.dataset = dataset
        self.trials = trials
        self.trials_source = trials_source
        self.notes = notes
        self._infos: dict = {}
        self._models: dict = {}
        self.loads: dict = {}        # model -> times load_model ran for it (the gates share one)
        self._pipelines: dict = {}
        self._comparable: dict = {}
        self._ie: dict = {}
        self._sweeps: dict = {}
        self._paged: dict = {}       # model -> whether its last page entry had the sweep
        self._live: dict = {}
        self._errors: dict = {}

    # --- construction ------------------------------------------------------------------
    @classmethod
    def create(cls, options: ParityOptions, rootdir: Path, reference_runner=None) -> "ParitySession":
        from fvkit.method.data import load_task_dataset
        from fvkit.method.fixed_trials import FixedTrials, trials_id

        dataset = load_task_dataset(options.dataset, str(options.data_dir) if options.data_dir else None)
        notes = []
        # The shipped trials file a default run uses; an explicit --seed is reconciled with it below.
        n_trials, n_shots, default_seed = DEFAULT_N_TRIALS, DEFAULT_N_SHOTS, DEFAULT_SEED
        path = None
        if options.fixed_trials and options.fixed_trials != GENERATE_TRIALS:
            path = Path(options.fixed_trials)
        elif options.fixed_trials is None:
            default = Path(options.data_dir or rootdir / "datasets") / "fixed_trials" / \
                f"{trials_id(dataset.name, n_trials, n_shots, default_seed)}.json"
            path = default if default.is_file() else None
        if path is not None:
            trials = FixedTrials.load(path, dataset)
            source = str(path)
            if options.seed_given and options.seed != trials.seed:
                notes.append(f"--seed {options.seed} was not used: the fixed-trials file {path.name} was drawn with "
                             f"seed {trials.seed}, and a trials file's seed is authoritative")
        else:
            trials = FixedTrials.make(dataset, n_trials, n_shots, options.seed)
            source = f"generated from --seed {options.seed}"
            notes.append(f"trials {trials.id} were drawn now with seed {options.seed} (no trials file used); "
                         f"snapshots exist only for shipped trials files")
        if options.max_trials is not None and options.max_trials > trials.n_trials:
            raise FvkitError(f"--max-trials {options.max_trials} exceeds the {trials.n_trials} trials of {trials.id}; "
                             f"pass 1..{trials.n_trials}")
        from fvkit.output_location import check_output_dir

        # The report folder is checked now, not when the first gate has finished.
        check_output_dir(Path(rootdir) / "results_fv" / dataset.name / trials.id, "report folder")
        session = cls(options, rootdir, dataset, trials, source, notes, reference_runner)
        session.check_releases()
        return session

    @property
    def requested_models(self) -> list:
        """--model, or the default parity models."""
        if self.options.models:
            return list(dict.fromkeys(self.options.models))
        from fvkit.models import zoo
        return list(zoo.DEFAULT_PARITY_MODELS)

    @property
    def model_names(self) -> list:
        """The requested models, kept to those of --reference-release when it is given."""
        wanted = self.options.reference_release
        return [m for m in self.requested_models if wanted is None or self.reference_release(m) == wanted]

    def reference_release(self, name: str) -> str:
        """The transformers release this model's reference numbers come from (its architecture's)."""
        from fvkit.parity.reference_release import release_of

        spec = self.spec_for(name)
        if spec is None and not self._is_zoo(name):
            try:
                spec = self.model_info(name).spec
            except FvkitError:
                spec = None   # the model's own gates report why it cannot be read
        return release_of(name, spec)

    @staticmethod
    def _is_zoo(name: str) -> bool:
        from fvkit.models.architectures import zoo_recipes
        return str(name) in zoo_recipes()

    def check_releases(self) -> None:
        """Before any work: --reference-release leaves some model, and --snapshot-update writes
        each model's snapshots only under its own release."""
        wanted = self.options.reference_release
        if wanted is not None:
            left_out = [m for m in self.requested_models if m not in self.model_names]
            if left_out:
                self.notes.append(f"--reference-release {wanted}: left out " + ", ".join(
                    f"{m} (reference release {self.reference_release(m)})" for m in left_out))
            if not self.model_names:
                # Not an error: `tox -e reference` runs every release's environment, and one
                # whose release no requested model declares has nothing to regenerate.
                self.notes.append(f"--reference-release {wanted}: none of {', '.join(self.requested_models)} has its "
                                  f"reference numbers from transformers {wanted}; no gate runs")
        if self.options.update_snapshots:
            from fvkit.parity.reference_release import check_update_release, installed_release

            installed = installed_release()
            for name in self.model_names:
                check_update_release(name, self.reference_release(name), installed)

    # --- models ------------------------------------------------------------------------
    def spec_for(self, name: str) -> Optional[str]:
        """--model-spec applies to the --model models it accompanies; any other model the
        session loads (M5's zoo model of each other spec) resolves its own spec."""
        return self.options.model_spec if name in (self.options.models or []) else None

    def model_info(self, name: str) -> ModelInfo:
        """Spec and dimensions from the model's config (no weights are loaded)."""
        if name not in self._infos:
            self._infos[name] = self._read_info(name)
        return self._infos[name]

    def _read_info(self, name: str) -> ModelInfo:
        from fvkit.models import loader as hf_loader

        if name in self._models:
            lm = self._models[name]
            return ModelInfo(name, model_id(name), lm.spec.name, lm.dims.n_layers, lm.dims.n_heads)
        described = hf_loader.describe_model(name, model_spec=self.spec_for(name))
        return ModelInfo(name, model_id(name), described.spec.name, described.dims.n_layers, described.dims.n_heads)

    def model(self, name: str):
        """The loaded model, once per session; a load error is raised again on later calls."""
        if name in self._errors:
            raise self._errors[name]
        if name not in self._models:
            from fvkit.models.loader import load_model
            self.loads[name] = self.loads.get(name, 0) + 1
            try:
                self._models[name] = load_model(name, model_spec=self.spec_for(name), device="cpu",
                                                dtype="fp32", quant="none", parity=True)
            except FvkitError as err:
                self._errors[name] = err
                raise
        return self._models[name]

    # --- settings ----------------------------------------------------------------------
    def settings_for(self, name: str) -> ModelSettings:
        """Per-model settings; a value the model cannot take raises FvkitError naming the range."""
        info = self.model_info(name)
        opts = self.options
        total = info.n_layers * info.n_heads
        notes = []
        if opts.n_top_heads is None:
            n_top = min(DEFAULT_N_TOP_HEADS, total)
            if n_top < DEFAULT_N_TOP_HEADS:
                notes.append(f"n_top_heads capped at {n_top}: {info.id} has {info.n_layers}x{info.n_heads} heads")
        elif opts.n_top_heads > total:
            raise FvkitError(f"--n-top-heads {opts.n_top_heads} is more than the {total} heads of {info.id} "
                             f"({info.n_layers} layers x {info.n_heads} heads); pass 1..{total}")
        else:
            n_top = opts.n_top_heads
        edit_layer = default_edit_layer(info.n_layers) if opts.edit_layer is None else opts.edit_layer
        if not 0 <= edit_layer < info.n_layers:
            raise FvkitError(f"--edit-layer {edit_layer} is out of range for {info.id}: valid layers are "
                             f"0..{info.n_layers - 1} ({info.n_layers} layers)")
        own = self.parity_defaults(name)
        max_trials = opts.max_trials if opts.max_trials is not None else own.max_trials
        # --edit-layer (a layer or 'all') decides the sweep for every model; without it each model's own default.
        sweep = opts.sweep if (opts.sweep or opts.edit_layer is not None) else own.sweep
        taken = [text for given, text in ((opts.max_trials is None and own.max_trials, f"{own.max_trials} trials"),
                                          (sweep and not opts.sweep, "the layer sweep")) if given]
        if taken:
            notes.append(f"{info.id} runs with its own parity settings, {' and '.join(taken)}, the settings of its "
                         f"stored reference numbers (--max-trials and --edit-layer override them)")
        used = self.trials.n_trials if max_trials is None else min(max_trials, self.trials.n_trials)
        if sweep:
            notes.append(f"layer sweep: stage files and M4's single-layer checks use the default layer "
                         f"{edit_layer}; the layer sweep covers layers 0..{info.n_layers - 1}")
        return ModelSettings(used, n_top, edit_layer, settings_key(self.trials.id, used, n_top, edit_layer),
                             tuple(notes), sweep=sweep, max_trials=max_trials)

    @staticmethod
    def parity_defaults(name: str):
        """The zoo model's own settings for what the command line leaves unset (none for other models)."""
        from fvkit.models.architectures import zoo_recipes
        from fvkit.models.architectures.architecture import ParityDefaults

        entry = zoo_recipes().get(str(name))
        return (entry.parity if entry is not None else None) or ParityDefaults()

    # --- computed once per model -------------------------------------------------------
    def ie_modes_for(self, name: str) -> tuple:
        """The indirect-effect modes M3 checks on ``name``: --ie-mode's when given; otherwise
        both on the tiny zoo models and only ``fast`` on real checkpoints. The exact mode
        costs one whole forward pass per head and trial (2,700 on SmolLM2-135M at the
        default settings, tens of minutes on a 2-core CPU), and fast against the
        reference's exact effects is the comparison that matters there."""
        if self.options.ie_mode_given or self.is_tiny(name):
            return self.options.ie_modes
        return ("fast",)

    def not_checked(self, name: str, check: str) -> Optional[str]:
        """Why this run leaves ``check`` out on ``name`` (None when it checks it): an
        indirect-effect mode ('exact', 'fast') or the layer sweep ('sweep'). The gates'
        tests exist only for what is checked; the sentence goes into the report instead."""
        if check == "sweep":
            return None if self.settings_for(name).sweep else "the layer sweep (--edit-layer all checks it)"
        if check in self.ie_modes_for(name):
            return None
        if self.options.ie_mode_given:
            return f"M3's {check} mode (--ie-mode {'/'.join(self.ie_modes_for(name))})"
        return (f"fvkit's M3 {check} mode: a real checkpoint checks fvkit's fast effects against the reference's "
                f"exact ones (--ie-mode both adds fvkit's exact mode, one forward pass per head)")

    @staticmethod
    def is_tiny(name: str) -> bool:
        """Whether ``name`` is a zoo model built from a recipe with random weights."""
        from fvkit.models.architectures import zoo_recipes
        entry = zoo_recipes().get(name)
        return entry is not None and entry.source == "random"

    def pipeline_ie_mode(self, name: str) -> str:
        """The indirect-effect mode the pipeline's later stages build on: exact whenever
        M3 checks it, so top heads and vector rest on the reference's own structure."""
        modes = self.ie_modes_for(name)
        return "exact" if "exact" in modes else modes[0]

    def pipeline(self, name: str):
        """fvkit's result for every stage, once per model (see :meth:`pipeline_ie_mode`)."""
        if name not in self._pipelines:
            from fvkit.pipeline import run_pipeline
            s = self.settings_for(name)
            self._pipelines[name] = run_pipeline(
                self.model(name), self.dataset, self.trials, n_top_heads=s.n_top_heads, edit_layer=s.edit_layer,
                max_trials=s.max_trials, ie_mode=self.pipeline_ie_mode(name), show_progress=False)
        return self._pipelines[name]

    def layer_sweep(self, name: str) -> dict:
        """fvkit's layer sweep of the pipeline's function vector, once per model."""
        if name not in self._sweeps:
            from fvkit.fast.sweep import layer_sweep
            result = self.pipeline(name)
            sweep = layer_sweep(self.model(name), self.dataset, self.trials, result.function_vector,
                                show_progress=False)
            result.timings["layer_sweep"] = sweep["seconds"]
            self._sweeps[name] = sweep
        return self._sweeps[name]

    def page_entry(self, name: str) -> Optional[dict]:
        """The model's figures, top heads and decoded vector for the HTML page, packed for
        shipping; None when nothing new was computed since the last call (the pipeline
        comes first, the layer sweep later)."""
        if not self.has_pipeline(name):
            return None
        shown = name in self._sweeps   # the sweep figure, once there is one
        if self._paged.get(name) == shown:
            return None
        from fvkit.report.page import pack_entry
        from fvkit.report.run_files import report_entry

        entry = report_entry(self.pipeline(name), self.dataset.name, self.model(name), self._sweeps.get(name),
                             reference=self.reference_result(name))
        self._paged[name] = shown
        return pack_entry(entry)

    def reference_result(self, name: str) -> Optional[dict]:
        """The reference's M4 numbers (top heads, evaluations) for the page, beside fvkit's: the
        live run's when this session made a valid one, else the stored snapshot for these settings."""
        live = self._live.get(name)
        if live and not (live.get("meta") or {}).get("invalid") and live.get("zero_shot"):
            return live
        return stored_m4_reference(self.rootdir / M4_SNAPSHOT_DIR /
                                   f"test_function_vector[{model_id(name)}][{self.settings_for(name).key}].json")

    def has_pipeline(self, name: str) -> bool:
        return name in self._pipelines

    def comparable(self, name: str) -> dict:
        """fvkit's comparable result dict; M1 also gets the trials' split and every stage's
        draws as word pairs, so the gate checks them against the split the reference's
        loader made and the pairs the reference's stages sampled."""
        if name not in self._comparable:
            result = self.pipeline(name).comparable()
            result["m1"]["split"] = {k: list(v) for k, v in self.trials.split.items()}
            result["m1"]["draws"] = self.trials.draws(self.dataset, self.settings_for(name).max_trials)
            self._comparable[name] = result
        return self._comparable[name]

    def indirect_effect(self, name: str, mode: str):
        """(tensor, seconds) of the indirect effect in ``mode``; the pipeline's own mode comes from it."""
        if mode == self.pipeline_ie_mode(name):
            result = self.pipeline(name)
            return result.indirect_effect, result.timings.get("indirect_effect", 0.0)
        if (name, mode) not in self._ie:
            from fvkit.pipeline import indirect_effects
            result = self.pipeline(name)
            start = time.perf_counter()
            ie = indirect_effects(self.model(name), self.dataset, self.trials, result.mean_activations,
                                  max_trials=self.settings_for(name).max_trials, mode=mode, show_progress=False)
            self._ie[(name, mode)] = (ie, round(time.perf_counter() - start, 4))
        return self._ie[(name, mode)]

    def live_reference(self, name: str) -> Optional[dict]:
        """The reference's comparable dict for this model (None without --reference-src)."""
        if not self.options.reference_src:
            return None
        if name not in self._live:
            if self.reference_runner is None:
                raise FvkitError("--reference-src was given but this session has no reference runner")
            s = self.settings_for(name)
            start = time.perf_counter()
            result = self.reference_runner(self.model(name), self.dataset.path, self.trials,
                                   reference_src=str(self.options.reference_src),
                                   baukit=str(self.options.baukit) if self.options.baukit else None,
                                   n_top_heads=s.n_top_heads, edit_layer=s.edit_layer,
                                   max_trials=s.max_trials, sweep=s.sweep,
                                   # Only where the reference cannot build its own vector does it
                                   # evaluate fvkit's (the runner calls this only then).
                                   injected_vector=lambda: self.pipeline(name).function_vector)
            result.setdefault("meta", {})["fvkit_seconds"] = round(time.perf_counter() - start, 4)
            self._live[name] = result
        return self._live[name]

    def run_dir(self, name: str) -> Path:
        """Where M5's reduced end-to-end run of a model writes its stage files."""
        return self.rootdir / "results_fv" / self.dataset.name / self.trials.id / "reduced_runs" / model_id(name)

    def describe(self) -> dict:
        return {"dataset": self.dataset.name, "dataset_path": self.dataset.path, "dataset_sha256": self.dataset.sha256,
                "fixed_trials_id": self.trials.id, "fixed_trials_source": self.trials_source,
                "trials_seed": self.trials.seed, "n_trials": self.trials.n_trials, "n_shots": self.trials.n_shots,
                "models": [model_id(m) for m in self.model_names], "options": self.options.describe()}
