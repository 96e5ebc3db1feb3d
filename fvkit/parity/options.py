"""Command-line and ini options of the parity suite, and their validation.

    pytest --model tiny-llama --max-trials 1 --n-top-heads 5 --edit-layer 1 --fail-fast
    # or in pytest.ini:  fvkit_model = tiny-llama   fvkit_max_trials = 1

Every option has an ini twin named ``fvkit_<option>`` (dashes as underscores);
the command line wins over the ini file, the ini file over the default.
Checks that need no model (device, dtype, numbers, paths, snapshot updates)
run at startup and end pytest with a usage error, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

# Parity runs on exactly one numeric setting, the reference's own (see fvkit.models.parity_setting).
from fvkit.method.run_defaults import DEFAULT_DATASET, DEFAULT_EDIT_LAYER_TEXT, DEFAULT_N_TOP_HEADS, DEFAULT_SEED
from fvkit.models.architectures.architecture import DEFAULT_REFERENCE_TRANSFORMERS
from fvkit.models.parity_setting import PARITY_DEVICE, PARITY_DTYPE, PARITY_QUANT

#: Spellings of the parity setting accepted on the command line.
DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "torch.float32": "fp32"}
QUANT_ALIASES = {"none": "none", "no": "none", "": "none"}

#: The transformers release the reference pins (its fv_environment.yml); each model's
#: own release is declared by its architecture (fvkit.parity.reference_release), and
#: its snapshots are written only under that release.
REFERENCE_TRANSFORMERS = DEFAULT_REFERENCE_TRANSFORMERS
#: The fixed-trials value that asks for trials drawn from --seed even when a file exists.
GENERATE_TRIALS = "generate"
#: The --edit-layer value that sweeps every layer (the reference's --edit_layer -1).
SWEEP_ALL = "all"
#: --ie-mode values and the indirect-effect modes each checks.
IE_MODES = {"both": ("exact", "fast"), "exact": ("exact",), "fast": ("fast",)}
DEFAULT_IE_MODE = "both"

# (name, ini type, help); the command-line flag is --name with dashes.
OPTIONS = (
    ("model", "linelist", "model to check: zoo alias, hub id or local path; repeatable "
                          "(default: every tiny offline model of the zoo)"),
    ("model-spec", "string", "registered ModelSpec for the --model models; any other model the run loads "
                             "(M5 checks each other spec on its zoo model) keeps its own (default: chosen from the model)"),
    ("dataset", "string", f"task dataset name or JSON file (default: {DEFAULT_DATASET})"),
    ("data-dir", "string", "directory holding the datasets (default: <rootdir>/datasets)"),
    ("fixed-trials", "string", "fixed-trials file (default: <data-dir>/fixed_trials/fixed_trials_<dataset>_t10_s10_seed0.json "
                               f"if present, else trials drawn with --seed; '{GENERATE_TRIALS}' always draws them)"),
    ("max-trials", "string", "use only the first N trials of mean_activations and indirect_effect (default: all)"),
    ("n-top-heads", "string", f"heads in the function vector (default: {DEFAULT_N_TOP_HEADS}, "
                              "capped at the model's head count)"),
    ("edit-layer", "string", f"layer the function vector is added at (default: {DEFAULT_EDIT_LAYER_TEXT}); "
                             f"'{SWEEP_ALL}' also "
                             "checks the zero-shot and shuffled-label evaluations at every layer (the layer sweep) "
                             "while the other stages use the default layer"),
    ("ie-mode", "string", f"indirect-effect modes M3 checks: {', '.join(IE_MODES)} (default: {DEFAULT_IE_MODE} on the "
                          "tiny zoo models, fast on real checkpoints, whose fast effects are compared with the "
                          "reference's exact ones); the "
                          "function vector is built from the exact mode's effects when it runs. 'fast' saves the "
                          "exact mode's one forward pass per head on large models"),
    ("seed", "string", f"seed for drawing trials when no trials file is used (default: {DEFAULT_SEED}); "
                       "a trials file's own seed is authoritative"),
    ("fail-fast", "bool", "after a model's first failing gate, skip that model's later gates"),
    ("reference-src", "string", "checkout of the reference code (folder holding src/); enables live reference runs"),
    ("baukit", "string", "checkout of baukit, needed by the live reference run"),
    ("reference-release", "string", "keep only the models whose reference numbers come from this transformers "
                                    "release, which must be the installed one (the tox reference-tfNNN "
                                    "environments; default: every model)"),
    ("torch-threads", "string", "torch CPU threads per process (default 1: the tiny models gain nothing from more, "
                                "and threads contend with xdist workers and other load; raise it for large models)"),
    ("device", "string", f"parity runs on '{PARITY_DEVICE}' only"),
    ("dtype", "string", f"parity runs in '{PARITY_DTYPE}' only"),
    ("quant", "string", f"parity runs with quantization '{PARITY_QUANT}' only"),
)


def ini_name(option: str) -> str:
    return "fvkit_" + option.replace("-", "_")


def dest_name(option: str) -> str:
    return "fvkit_" + option.replace("-", "_")


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("fvkit parity", "fvkit parity suite (function-vector parity with the reference code)")
    for name, kind, help_text in OPTIONS:
        flag = f"--{name}"
        if kind == "bool":
            group.addoption(flag, action="store_true", default=None, dest=dest_name(name), help=help_text)
        elif kind == "linelist":
            group.addoption(flag, action="append", default=None, dest=dest_name(name), metavar="NAME", help=help_text)
        else:
            group.addoption(flag, action="store", default=None, dest=dest_name(name), metavar=name.split("-")[-1].upper(),
                            help=help_text)
        parser.addini(ini_name(name), help=help_text, type=kind, default=None if kind != "bool" else False)


def raw_value(config: pytest.Config, name: str):
    """Command line first, then the ini file; None when neither sets it."""
    value = config.getoption(dest_name(name), default=None)
    if value is not None:
        return value
    value = config.getini(ini_name(name))
    if value in (None, "", []):
        return None
    return value


@dataclass
class ParityOptions:
    """The parity options after parsing and model-free validation.

        opts = ParityOptions.from_config(config)
        opts.models or zoo.DEFAULT_PARITY_MODELS
    """

    models: list = field(default_factory=list)
    model_spec: Optional[str] = None
    dataset: str = DEFAULT_DATASET
    data_dir: Optional[Path] = None
    fixed_trials: Optional[str] = None
    max_trials: Optional[int] = None
    n_top_heads: Optional[int] = None
    edit_layer: Optional[int] = None
    sweep: bool = False
    ie_modes: tuple = IE_MODES[DEFAULT_IE_MODE]
    #: Whether --ie-mode was given; without it real checkpoints check the fast mode only
    #: (see ParitySession.ie_modes_for).
    ie_mode_given: bool = False
    seed: int = DEFAULT_SEED
    seed_given: bool = False
    fail_fast: bool = False
    reference_src: Optional[Path] = None
    baukit: Optional[Path] = None
    update_snapshots: bool = False
    reference_release: Optional[str] = None
    torch_threads: Optional[int] = None   # None: one thread (see parity_tests/conftest.py)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "ParityOptions":
        check_numeric_mode(config)
        rootdir = Path(str(config.rootpath))
        opts = cls()
        opts.models = [m for m in (raw_value(config, "model") or []) if str(m).strip()]
        opts.model_spec = raw_value(config, "model-spec")
        opts.dataset = raw_value(config, "dataset") or DEFAULT_DATASET
        data_dir = raw_value(config, "data-dir")
        opts.data_dir = _path(data_dir, rootdir) if data_dir else rootdir / "datasets"
        trials = raw_value(config, "fixed-trials")
        opts.fixed_trials = None if trials is None else (trials if trials == GENERATE_TRIALS else str(_path(trials, Path.cwd())))
        opts.max_trials = _int(config, "max-trials", minimum=1)
        opts.n_top_heads = _int(config, "n-top-heads", minimum=1)
        if str(raw_value(config, "edit-layer") or "").strip().lower() == SWEEP_ALL:
            opts.sweep = True
        else:
            opts.edit_layer = _int(config, "edit-layer", minimum=None, alternatives=f" or '{SWEEP_ALL}'")
        opts.ie_mode_given = raw_value(config, "ie-mode") is not None
        mode = str(raw_value(config, "ie-mode") or DEFAULT_IE_MODE).strip().lower()
        if mode not in IE_MODES:
            raise pytest.UsageError(f"--ie-mode must be one of {', '.join(IE_MODES)}, got {mode!r}")
        opts.ie_modes = IE_MODES[mode]
        seed = _int(config, "seed", minimum=0)
        opts.seed_given = seed is not None
        opts.seed = DEFAULT_SEED if seed is None else seed
        opts.fail_fast = bool(raw_value(config, "fail-fast"))
        opts.torch_threads = _int(config, "torch-threads", minimum=1)
        for name in ("reference-src", "baukit"):
            value = raw_value(config, name)
            if value:
                path = _path(value, Path.cwd())
                if not path.is_dir():
                    raise pytest.UsageError(f"--{name} {value}: no such directory; pass the checkout's folder")
                setattr(opts, name.replace("-", "_"), path)
        if opts.reference_src and not any((opts.reference_src / sub / "utils").is_dir() for sub in ("src", ".")):
            raise pytest.UsageError(
                f"--reference-src {opts.reference_src}: no src/utils/ inside; pass the root of the "
                f"function_vectors checkout (the folder that holds src/)"
            )
        opts.update_snapshots = bool(getattr(config.option, "update_snapshots", False)
                                     or getattr(config.option, "update_new_snapshots_only", False))
        if opts.update_snapshots and not opts.reference_src:
            raise pytest.UsageError(
                "--snapshot-update writes reference numbers and needs a live reference: add "
                "--reference-src PATH (and --baukit PATH); snapshots are never written from fvkit's own output"
            )
        release = raw_value(config, "reference-release")
        if release:
            import transformers

            release = str(release).strip()
            if release != transformers.__version__:
                raise pytest.UsageError(
                    f"--reference-release {release}: this environment has transformers {transformers.__version__}; "
                    f"run it where {release} is installed (tox -e reference regenerates each model in its own release)")
            opts.reference_release = release
        return opts

    def describe(self) -> dict:
        return {
            "models": list(self.models), "model_spec": self.model_spec, "dataset": self.dataset,
            "data_dir": str(self.data_dir) if self.data_dir else None, "fixed_trials": self.fixed_trials,
            "max_trials": self.max_trials, "n_top_heads": self.n_top_heads,
            "edit_layer": SWEEP_ALL if self.sweep else self.edit_layer, "ie_modes": list(self.ie_modes),
            "seed": self.seed if self.seed_given else None, "fail_fast": self.fail_fast,
            "reference_src": str(self.reference_src) if self.reference_src else None,
            "baukit": str(self.baukit) if self.baukit else None, "update_snapshots": self.update_snapshots,
            "reference_release": self.reference_release,
            "torch_threads": self.torch_threads or 1,
        }


def _path(value: str, base: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _int(config: pytest.Config, name: str, minimum: Optional[int], alternatives: str = "") -> Optional[int]:
    value = raw_value(config, name)
    if value is None:
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        raise pytest.UsageError(f"--{name} must be a whole number{alternatives}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise pytest.UsageError(f"--{name} must be at least {minimum}, got {number}")
    return number


def check_numeric_mode(config: pytest.Config) -> None:
    """Refuse any device, dtype or quantization but the reference's (a usage error)."""
    device = str(raw_value(config, "device") or PARITY_DEVICE).strip().lower()
    dtype = str(raw_value(config, "dtype") or PARITY_DTYPE).strip().lower()
    quant = str(raw_value(config, "quant") or PARITY_QUANT).strip().lower()
    problems = []
    if device != PARITY_DEVICE:
        problems.append(f"--device {device}")
    if DTYPE_ALIASES.get(dtype) != PARITY_DTYPE:
        problems.append(f"--dtype {dtype}")
    if QUANT_ALIASES.get(quant) != PARITY_QUANT:
        problems.append(f"--quant {quant}")
    if problems:
        raise pytest.UsageError(
            f"the parity suite refuses {', '.join(problems)}: parity compares numbers with the reference's "
            f"run, which is {PARITY_DEVICE}/{PARITY_DTYPE}/quant {PARITY_QUANT}; drop the option(s) "
            f"(use `fvkit run` for other settings)"
        )
