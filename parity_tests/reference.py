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
hub names) is bridged here and nowhere else: the ``MODEL_CONFIG`` dict is built
from the fvkit ModelSpec and dimensions, and every such bridge is recorded as a
sentence in ``meta["normalizations"]``. Stages the reference cannot compute
faithfully for a model are listed in ``meta["unsupported"]`` with the reason and
left as ``None``; intervention numbers the reference computes without actually
intervening (transformers releases whose decoder blocks return a plain tensor)
are kept but flagged in ``meta["invalid"]["m4"]``.

The result has the layout of ``fvkit.pipeline.PipelineResult.comparable()`` (see
``docs/reference_runner.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from fvkit.models.adapters import block_name, out_proj_name, resolve_out_proj
from fvkit.errors import DataError, FvkitError, SpecError

#: The BOS text the reference writes into prompts when the tokenizer adds none
#: (hard-coded in its ``word_pairs_to_prompt_data``).
REFERENCE_BOS_TEXT = "<|endoftext|>"
#: File whose presence identifies a reference checkout.
REFERENCE_MARKER = Path("src") / "utils" / "extract_utils.py"
#: Top-level module names the reference and baukit occupy while being imported.
REFERENCE_TOP_MODULES = ("utils", "compute_indirect_effect", "baukit")
#: Result keys of the numeric stages, in pipeline order.
RESULT_STAGES = ("mean_activations", "indirect_effect", "top_heads", "function_vector",
                 "zero_shot", "shuffled", "baseline")
#: Prompt-drawing stages (keys of ``m1.prompts``), in the order the runner calls them.
PROMPT_STAGES = ("mean_activations", "indirect_effect", "zero_shot", "shuffled", "baseline")
#: What each result key needs first; an unsupported stage makes its dependants unsupported.
STAGE_NEEDS = {
    "indirect_effect": ("mean_activations",),
    "top_heads": ("indirect_effect",),
    "function_vector": ("mean_activations", "top_heads"),
    "zero_shot": ("function_vector",),
    "shuffled": ("function_vector",),
}
#: Reference branches by module layout (blocks path, attention path, out-projection path).
#: The branch name is what ``MODEL_CONFIG['name_or_path']`` must contain for the
#: reference's ``compute_function_vector`` to find the out-projection
#: (it uses these fixed attribute paths) and for ``replace_activation_w_avg`` to
#: apply it the right way; ``bias`` is whether that branch applies a bias there.
REFERENCE_BRANCHES = {
    ("transformer.h", "attn", "c_proj"): {"name": "gpt2-xl", "conv1d": True, "bias": True},
    ("transformer.h", "attn", "out_proj"): {"name": "gpt-j", "conv1d": False, "bias": False},
    ("gpt_neox.layers", "attention", "dense"): {"name": "gpt-neox", "conv1d": False, "bias": True},
    ("model.layers", "self_attn", "o_proj"): {"name": "llama", "conv1d": False, "bias": False},
}
#: name_or_path for a layout no reference branch serves; it contains none of the
#: substrings the reference branches on.
NO_BRANCH_NAME = "fvkit-unsupported-layout"


# --------------------------------------------------------------------------------------
# Importing the reference and baukit from the paths given
# --------------------------------------------------------------------------------------

@dataclass
class ReferenceModules:
    """The reference's modules, imported from one checkout (cached per path pair)."""

    src: Path
    baukit_dir: Path
    prompt_utils: types.ModuleType
    model_utils: types.ModuleType
    intervention_utils: types.ModuleType
    eval_utils: types.ModuleType
    extract_utils: types.ModuleType
    compute_indirect_effect: types.ModuleType
    baukit: types.ModuleType
    normalizations: list = field(default_factory=list)

    def namespaces(self) -> dict:
        return {
            "utils.prompt_utils": self.prompt_utils, "utils.model_utils": self.model_utils,
            "utils.intervention_utils": self.intervention_utils, "utils.eval_utils": self.eval_utils,
            "utils.extract_utils": self.extract_utils, "compute_indirect_effect": self.compute_indirect_effect,
        }


_MODULE_CACHE: dict = {}


def reference_src_dir(reference_src) -> Path:
    """The checkout's ``src`` folder; accepts the checkout or its ``src`` folder."""
    root = Path(reference_src).expanduser()
    if (root / REFERENCE_MARKER).is_file():
        return (root / "src").resolve()
    if (root / "utils" / "extract_utils.py").is_file():
        return root.resolve()
    raise FvkitError(
        f"reference checkout '{reference_src}' is not usable: expected a function_vectors "
        f"checkout containing {REFERENCE_MARKER} (github.com/ericwtodd/function_vectors); "
        f"pass --reference-src PATH or set FVKIT_REFERENCE_SRC"
    )


def baukit_package_dir(baukit=None) -> Path:
    """The ``baukit`` package folder: from a checkout path, the package path, or the installed one."""
    if baukit is not None:
        root = Path(baukit).expanduser()
        for cand in (root / "baukit", root):
            if (cand / "nethook.py").is_file():
                return cand.resolve()
        raise FvkitError(
            f"baukit not found at '{baukit}': expected a davidbau/baukit checkout containing "
            f"baukit/nethook.py; pass --baukit PATH (or set FVKIT_BAUKIT) or pip install baukit"
        )
    spec = importlib.util.find_spec("baukit")
    if spec is None or not spec.submodule_search_locations:
        raise FvkitError(
            "baukit is not installed and no path was given; pass --baukit PATH to a davidbau/baukit "
            "checkout (or set FVKIT_BAUKIT) or pip install baukit"
        )
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _drop_modules(tops) -> dict:
    """Remove modules under the given top-level names from sys.modules; returns them."""
    gone = {}
    for name in list(sys.modules):
        if name.split(".")[0] in tops:
            gone[name] = sys.modules.pop(name)
    return gone


def _import_baukit(pkg_dir: Path, notes: list) -> types.ModuleType:
    parent = str(pkg_dir.parent)
    sys.path.insert(0, parent)
    try:
        try:
            module = importlib.import_module("baukit")
        except ImportError as err:
            # baukit's package __init__ pulls in widget and image modules (torchvision,
            # IPython); the reference uses only nethook's TraceDict and get_module.
            _drop_modules(("baukit",))
            shim = types.ModuleType("baukit")
            shim.__path__ = [str(pkg_dir)]
            shim.__file__ = str(pkg_dir / "__init__.py")
            sys.modules["baukit"] = shim
            nethook = importlib.import_module("baukit.nethook")
            for name in dir(nethook):
                if not name.startswith("_"):
                    setattr(shim, name, getattr(nethook, name))
            notes.append(
                f"baukit's package __init__ does not import here ({type(err).__name__}: {err}); "
                f"baukit/nethook.py was loaded alone as the 'baukit' package (the reference uses only "
                f"TraceDict and get_module, both defined there)"
            )
            module = shim
    finally:
        sys.path.remove(parent)
    origin = Path(getattr(module, "__file__", "") or "").resolve().parent
    if origin != pkg_dir:
        raise FvkitError(f"'import baukit' resolved to {origin}, not the requested {pkg_dir}; "
                         f"remove the other baukit from sys.path or pass --baukit to it")
    return module


class StubbedAttributeError(FvkitError, AttributeError):
    """An attribute of a stand-in module was used for real."""


def _bitsandbytes_stub(notes: list) -> Optional[types.ModuleType]:
    """A stand-in for bitsandbytes when it cannot be imported (the reference imports it
    at module top but uses it only to dequantize 4-bit LLaMA-2-70B weights)."""
    try:
        importlib.import_module("bitsandbytes")
        return None
    except Exception as err:  # a broken install raises more than ImportError
        reason = f"{type(err).__name__}: {err}"

    def _unavailable(name):
        # An AttributeError too, so hasattr() probes (inspect, transformers) see a bare module.
        if name.startswith("__"):
            raise AttributeError(name)
        raise StubbedAttributeError(f"the reference used bitsandbytes.{name}, which is only stubbed here "
                                    f"({reason}); 4-bit quantized models are not supported by the reference runner")

    stub = types.ModuleType("bitsandbytes")
    stub.__getattr__ = _unavailable
    notes.append(f"bitsandbytes is not importable ({reason}); a stub module stands in for the reference's "
                 f"top-level 'import bitsandbytes' (used only for 4-bit LLaMA-2-70B, never on this path)")
    return stub


@contextlib.contextmanager
def _reference_warnings_hidden():
    """Deprecation noise from the reference's own code (invalid escapes, numpy 2's copy
    keyword) says nothing about fvkit; keep it out of test reports."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", SyntaxWarning)
        yield


def load_reference(reference_src, baukit=None) -> ReferenceModules:
    """Import the reference's modules from ``reference_src`` with baukit from ``baukit``.

    The modules are imported under their own names (``utils.*``, as the reference's
    scripts do) and then taken out of ``sys.modules`` again, so that a project module
    called ``utils`` is neither shadowed nor shadows them; the function objects keep
    their module globals and stay usable.
    """
    src = reference_src_dir(reference_src)
    pkg_dir = baukit_package_dir(baukit)
    key = (src, pkg_dir)
    if key in _MODULE_CACHE:
        return _MODULE_CACHE[key]
    notes: list = []
    saved = _drop_modules(REFERENCE_TOP_MODULES)
    had_bnb = "bitsandbytes" in sys.modules
    try:
        with _reference_warnings_hidden():
            bk = _import_baukit(pkg_dir, notes)
        stub = _bitsandbytes_stub(notes)
        if stub is not None:
            sys.modules["bitsandbytes"] = stub
        sys.path.insert(0, str(src))
        try:
            with _reference_warnings_hidden():
                mods = {name: importlib.import_module(name) for name in (
                    "utils.prompt_utils", "utils.model_utils", "utils.intervention_utils",
                    "utils.eval_utils", "utils.extract_utils", "compute_indirect_effect")}
        except ImportError as err:
            raise FvkitError(f"importing the reference from {src} failed ({type(err).__name__}: {err}); "
                             f"install its dependencies (pandas, scikit-learn, tqdm) in this environment") from None
        finally:
            sys.path.remove(str(src))
            if stub is not None and not had_bnb:
                sys.modules.pop("bitsandbytes", None)
        for name, mod in mods.items():
            if not Path(mod.__file__).resolve().is_relative_to(src):
                raise FvkitError(f"reference module '{name}' resolved to {mod.__file__}, outside {src}; "
                                 f"another '{name.split('.')[0]}' shadows the reference")
    finally:
        _drop_modules(REFERENCE_TOP_MODULES)
        sys.modules.update(saved)
    refs = ReferenceModules(
        src=src, baukit_dir=pkg_dir, prompt_utils=mods["utils.prompt_utils"], model_utils=mods["utils.model_utils"],
        intervention_utils=mods["utils.intervention_utils"], eval_utils=mods["utils.eval_utils"],
        extract_utils=mods["utils.extract_utils"], compute_indirect_effect=mods["compute_indirect_effect"],
        baukit=bk, normalizations=notes,
    )
    _MODULE_CACHE[key] = refs
    return refs


def _git(cwd: Path, *args) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def checkout_state(path: Path, sub: str) -> dict:
    """Commit of a checkout and whether the files under ``sub`` are that commit's files.

    Blob hashes are compared file by file, because a checkout's index may be out of
    step with its files (``git status`` then reports changes that are not there).
    """
    top = _git(path, "rev-parse", "--show-toplevel")
    commit = _git(path, "rev-parse", "HEAD") if top else None
    if not commit:
        return {"commit": "unknown", "matches_commit": None}
    listing = _git(Path(top), "ls-tree", "-r", "HEAD", "--", sub) or ""
    entries = [line.split("\t", 1) for line in listing.splitlines() if "\t" in line]
    files = [(meta.split()[2], rel) for meta, rel in entries]
    if not files:
        return {"commit": commit, "matches_commit": None}
    present = [(sha, rel) for sha, rel in files if (Path(top) / rel).is_file()]
    hashes = (_git(Path(top), "hash-object", *[rel for _, rel in present]) or "").split()
    same = len(present) == len(files) and hashes == [sha for sha, _ in present]
    return {"commit": commit, "matches_commit": same}


# --------------------------------------------------------------------------------------
# MODEL_CONFIG: the one place where fvkit's model description becomes the reference's
# --------------------------------------------------------------------------------------

@dataclass
class ReferenceConfig:
    """The reference's MODEL_CONFIG for one loaded model, with what it took to build it."""

    model_config: dict
    normalizations: list
    unsupported: dict          # result key -> reason
    branch: Optional[str]


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _mark(unsupported: dict, keys, reason: str) -> None:
    for key in keys:
        unsupported.setdefault(key, reason)


def propagate_unsupported(unsupported: dict) -> dict:
    """Make every stage that needs an unsupported stage unsupported too, naming the root cause."""
    roots = dict(unsupported)
    for key, needs in STAGE_NEEDS.items():  # listed in pipeline order, so one pass suffices
        if key in unsupported:
            continue
        for need in needs:
            if need in unsupported:
                unsupported[key] = f"needs {need}, which is unsupported: {roots[need]}"
                roots[key] = roots[need]
                break
    return unsupported


def reference_model_config(lm) -> ReferenceConfig:
    """Build the reference's MODEL_CONFIG from ``lm.spec`` and ``lm.dims``.

    The reference derives its config inside ``load_gpt_model_and_tokenizer`` from a
    hub name; its stage functions read ``n_heads``, ``n_layers``, ``resid_dim``,
    ``attn_hook_names``, ``layer_hook_names``, ``prepend_bos`` and branch on
    substrings of ``name_or_path``. The branch is picked here by module layout.
    """
    spec, dims, model = lm.spec, lm.dims, lm.model
    n_layers, n_heads = int(dims.n_layers), int(dims.n_heads)
    notes, unsupported = [], {}
    attn_hooks = [out_proj_name(spec, i) for i in range(n_layers)]
    layer_hooks = [block_name(spec, i) for i in range(n_layers)]
    layout = (spec.blocks_path, spec.attn_path_in_block, spec.out_proj_path_in_attn)
    branch = REFERENCE_BRANCHES.get(layout)
    name = branch["name"] if branch else NO_BRANCH_NAME
    config = {
        "n_heads": n_heads,
        "n_layers": n_layers,
        "resid_dim": int(dims.hidden_size),
        "name_or_path": name,
        "attn_hook_names": attn_hooks,
        "layer_hook_names": layer_hooks,
        "prepend_bos": bool(spec.prepend_bos),
    }
    notes.append(
        f"MODEL_CONFIG built from ModelSpec '{spec.name}' and the model's dimensions instead of the "
        f"reference's load_gpt_model_and_tokenizer (which only knows hub names): n_heads={n_heads}, "
        f"n_layers={n_layers}, resid_dim=hidden_size={dims.hidden_size}, prepend_bos={spec.prepend_bos}"
    )
    notes.append(f"attn_hook_names = {spec.blocks_path}.{{L}}.{spec.attn_path_in_block}."
                 f"{spec.out_proj_path_in_attn}; layer_hook_names = {spec.blocks_path}.{{L}} (from the spec's paths)")
    notes.append("the model and tokenizer are the ones fvkit loaded, used as they are (the reference's loader, "
                 "its dtype choice and its pad_token=eos setting are not applied; prompts are single, unpadded)")

    if len(spec.blocks_path.split(".")) != 2:
        _mark(unsupported, ("indirect_effect", "zero_shot", "shuffled"),
              f"the reference reads the layer index as the third dotted component of a hook name, but "
              f"blocks_path '{spec.blocks_path}' puts it elsewhere")

    if branch is None:
        known = "; ".join(f"{'.'.join(k)} -> '{v['name']}'" for k, v in REFERENCE_BRANCHES.items())
        reason = (f"no reference branch has the module layout {spec.blocks_path}.{{L}}."
                  f"{spec.attn_path_in_block}.{spec.out_proj_path_in_attn} (its branches: {known})")
        _mark(unsupported, ("indirect_effect", "function_vector"), reason)
        notes.append(f"name_or_path='{name}': {reason}")
    else:
        out_proj = resolve_out_proj(model, spec, 0)
        has_bias = getattr(out_proj, "bias", None) is not None
        conv = _is_conv1d(out_proj)
        notes.append(
            f"name_or_path='{name}' selects the reference's '{name}' branch, which has this module layout "
            f"({'.'.join(layout)}; out-projection {type(out_proj).__name__}, "
            f"{'with' if has_bias else 'without'} bias)"
        )
        if conv != branch["conv1d"]:
            _mark(unsupported, ("indirect_effect",),
                  f"the reference's '{name}' branch expects a {'Conv1D' if branch['conv1d'] else 'Linear'} "
                  f"out-projection, this model has {type(out_proj).__name__}")
        if has_bias and not branch["bias"]:
            _mark(unsupported, ("indirect_effect",),
                  f"the out-projection has a bias, which the reference's '{name}' branch leaves out when it "
                  f"recomputes the projection after patching a head, so its indirect effects would drift")
        if branch["bias"] and not has_bias:
            _mark(unsupported, ("indirect_effect",),
                  f"the reference's '{name}' branch adds the out-projection's bias, which this model lacks")

    if n_heads * int(dims.head_dim) != int(dims.hidden_size):
        _mark(unsupported, ("mean_activations",),
              f"n_heads*head_dim = {n_heads}*{dims.head_dim} != hidden_size {dims.hidden_size}; the reference "
              f"splits head outputs with resid_dim//n_heads")

    if not spec.prepend_bos and spec.bos_text != REFERENCE_BOS_TEXT:
        reason = (f"spec '{spec.name}' writes BOS text {spec.bos_text!r} but the reference writes the literal "
                  f"{REFERENCE_BOS_TEXT!r}, so every prompt differs")
        _mark(unsupported, ("m1",) + RESULT_STAGES, reason)

    return ReferenceConfig(config, notes, propagate_unsupported(unsupported), name if branch else None)


# --------------------------------------------------------------------------------------
# Recording what the reference actually built
# --------------------------------------------------------------------------------------

class _Recorder:
    """Collects the prompts, token labels and split the reference built, per stage."""

    def __init__(self):
        self.stage: Optional[str] = None
        self.prompts: dict = {}
        self.token_labels = None
        self.label_prompt = None
        self.dummy_labels = None
        self.idx_map = None
        self.idx_avg = None
        self.split_calls: list = []
        self.patched: list = []

    def begin(self, stage: Optional[str]) -> None:
        self.stage = stage
        if stage is not None:
            self.prompts.setdefault(stage, [])


def _swap(stack: contextlib.ExitStack, module: types.ModuleType, name: str, new) -> None:
    old = module.__dict__[name]
    module.__dict__[name] = new
    stack.callback(module.__dict__.__setitem__, name, old)


def _install_recorders(stack: contextlib.ExitStack, refs: ReferenceModules, rec: _Recorder, progress: bool) -> None:
    pu, eu = refs.prompt_utils, refs.extract_utils
    make_prompt_data = pu.word_pairs_to_prompt_data
    create_prompt = pu.create_prompt

    @functools.wraps(make_prompt_data)
    def recording_prompt_data(*args, **kwargs):
        prompt_data = make_prompt_data(*args, **kwargs)
        if rec.stage is not None:
            rec.prompts[rec.stage].append(create_prompt(prompt_data))
        return prompt_data

    # The stage modules star-import word_pairs_to_prompt_data; swapping it in their
    # namespaces records stage prompts but not the dummy prompt that
    # get_dummy_token_labels builds inside prompt_utils.
    for mname, mod in refs.namespaces().items():
        if mod is not pu and mod.__dict__.get("word_pairs_to_prompt_data") is make_prompt_data:
            _swap(stack, mod, "word_pairs_to_prompt_data", recording_prompt_data)
            rec.patched.append(mname)

    def first_only() -> bool:
        # M1 compares the first mean_activations prompt only.
        return rec.stage == "mean_activations"

    meta_labels = eu.get_token_meta_labels

    def recording_meta_labels(*args, **kwargs):
        labels, prompt = meta_labels(*args, **kwargs)
        if first_only() and rec.token_labels is None:
            rec.token_labels, rec.label_prompt = labels, prompt
        return labels, prompt

    dummy = eu.get_dummy_token_labels

    def recording_dummy(*args, **kwargs):
        labels = dummy(*args, **kwargs)
        if first_only() and rec.dummy_labels is None:
            rec.dummy_labels = labels
        return labels

    dup = eu.compute_duplicated_labels

    def recording_dup(*args, **kwargs):
        idx_map, idx_avg = dup(*args, **kwargs)
        if first_only() and rec.idx_map is None:
            rec.idx_map, rec.idx_avg = dict(idx_map), dict(idx_avg)
        return idx_map, idx_avg

    split = pu.train_test_split

    def recording_split(*args, **kwargs):
        parts = split(*args, **kwargs)
        rec.split_calls.append([list(p.index) for p in parts])
        return parts

    _swap(stack, eu, "get_token_meta_labels", recording_meta_labels)
    _swap(stack, eu, "get_dummy_token_labels", recording_dummy)
    _swap(stack, eu, "compute_duplicated_labels", recording_dup)
    _swap(stack, pu, "train_test_split", recording_split)
    if not progress:
        for mod in (refs.eval_utils, refs.compute_indirect_effect):
            if "tqdm" in mod.__dict__:
                _swap(stack, mod, "tqdm", functools.partial(mod.__dict__["tqdm"], disable=True))


@contextlib.contextmanager
def _process_state_kept():
    """The reference's set_seed reseeds every RNG, sets cudnn flags and PYTHONHASHSEED;
    put them back afterwards so a test session is not changed by running it."""
    py, npy, tch = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env = os.environ.get("PYTHONHASHSEED")
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(tch)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if env is None:
            os.environ.pop("PYTHONHASHSEED", None)
        else:
            os.environ["PYTHONHASHSEED"] = env


# --------------------------------------------------------------------------------------
# Split and injection checks
# --------------------------------------------------------------------------------------

def split_from_calls(calls: list) -> Optional[dict]:
    """Row indices of train/valid/test from the reference's two train_test_split calls:
    (train, rest) on the whole frame, then (test, valid) on the rest."""
    if len(calls) != 2:
        return None
    (train, _), (test, valid) = calls
    return {"train": [int(i) for i in train], "valid": [int(i) for i in valid], "test": [int(i) for i in test]}


def split_row_mismatches(ref_dataset: dict, rows: list, split: dict, limit: int = 5) -> list:
    """Rows where the reference's loaded value differs from the file's text.

    The reference reads datasets with ``pandas.read_json``, which turns an all-digit
    column into integers ('007' becomes 7), so its prompts can differ from the file.
    """
    out = []
    for part, idxs in split.items():
        for col in ("input", "output"):
            values = ref_dataset[part][col]
            for pos, (ref_value, row) in enumerate(zip(values, idxs)):
                file_value = rows[row][col]
                if str(ref_value) != file_value:
                    out.append({"split": part, "position": pos, "row": row, "column": col,
                                "reference": str(ref_value), "file": file_value})
                    if len(out) >= limit:
                        return out
    return out


def reference_split(refs: ReferenceModules, dataset_path, test_size: float, seed: int) -> dict:
    """The reference's own train/valid/test split of a dataset file, as row indices,
    with rows whose loaded value differs from the file (no model needed)."""
    path = Path(dataset_path)
    rows = json.loads(path.read_text())
    rec = _Recorder()
    with tempfile.TemporaryDirectory(prefix="fvkit-ref-data-") as root, contextlib.ExitStack() as stack:
        _link_dataset(path, Path(root))
        _install_recorders(stack, refs, rec, progress=False)
        ds = refs.prompt_utils.load_dataset(path.stem, root_data_dir=root, test_size=test_size, seed=seed)
    split = split_from_calls(rec.split_calls)
    lengths = {part: len(ds[part]) for part in ("train", "valid", "test")}
    return {"split": split, "lengths": lengths,
            "row_mismatches": split_row_mismatches(ds, rows, split) if split else []}


def _link_dataset(path: Path, root: Path) -> Path:
    """The reference's load_dataset wants <root>/{abstractive,extractive}/<name>.json."""
    (root / "abstractive").mkdir(parents=True, exist_ok=True)
    link = root / "abstractive" / f"{path.stem}.json"
    link.symlink_to(path.resolve())
    return link


def probe_injection(refs: ReferenceModules, lm, model_config: dict, fv, edit_layer: int, sentence: str) -> dict:
    """Whether the reference's FV intervention changes anything on this transformers release.

    ``add_function_vector`` edits ``output[0]`` only when a decoder block returns a
    tuple; from transformers 4.54 (LLaMA family) / 5.3 (GPT-2) blocks return a plain
    tensor and the edit is silently skipped. Two probes: the type a block returns,
    and whether the reference's own ``function_vector_intervention`` moves the logits.
    """
    model, tokenizer = lm.model, lm.tokenizer
    name = model_config["layer_hook_names"][edit_layer]
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("type", type(out).__name__ if not isinstance(out, tuple) else "tuple"))
    try:
        inputs = tokenizer([sentence], return_tensors="pt").to(model.device)
        model(**inputs)
    finally:
        handle.remove()
    clean, edited = refs.intervention_utils.function_vector_intervention(
        [sentence], target=[""], edit_layer=edit_layer, function_vector=fv, model=model,
        model_config=model_config, tokenizer=tokenizer, compute_nll=False)
    change = float((edited.float() - clean.float()).abs().max())
    fv_norm = float(fv.float().norm())
    is_tuple = seen.get("type") == "tuple"
    reason = None
    if not is_tuple:
        reason = (f"transformers {_version('transformers')}: decoder block '{name}' returns a plain "
                  f"{seen.get('type')}, and the reference's add_function_vector edits only tuple outputs, so its "
                  f"'intervened' logits are the clean logits (max |change| = {change:g})")
    elif change == 0.0 and fv_norm > 0.0:
        reason = (f"the reference's function_vector_intervention left the logits unchanged (max |change| = 0) "
                  f"although block '{name}' returns a tuple and the function vector is nonzero")
    return {"block": name, "block_output_type": seen.get("type"), "max_abs_logit_change": change,
            "function_vector_norm": fv_norm, "invalid_reason": reason}


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

class ReferenceStageError(FvkitError):
    """A reference stage raised on a model the runner considered supported."""


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:
        return "unknown"


def _check_settings(lm, trials, n_top_heads, edit_layer, max_trials) -> int:
    for attr in ("seed", "n_shots", "n_trials", "test_size"):
        if not hasattr(trials, attr):
            raise DataError(f"trials object {type(trials).__name__} has no '{attr}'; pass a fvkit FixedTrials")
    n_layers, n_heads = int(lm.dims.n_layers), int(lm.dims.n_heads)
    if isinstance(edit_layer, bool) or not isinstance(edit_layer, int) or not 0 <= edit_layer < n_layers:
        raise SpecError(f"edit_layer {edit_layer} is out of range for this model: valid layers are 0..{n_layers - 1}")
    if isinstance(n_top_heads, bool) or not isinstance(n_top_heads, int) or not 1 <= n_top_heads <= n_layers * n_heads:
        raise FvkitError(f"n_top_heads must be between 1 and {n_layers * n_heads} (layers x heads), got {n_top_heads}")
    k = trials.n_trials if max_trials is None else max_trials
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= trials.n_trials:
        raise FvkitError(f"max_trials must be between 1 and the {trials.n_trials} trials of the fixed-trials "
                         f"file, got {max_trials}")
    return k


def _dataset_file(dataset_path, trials) -> Path:
    path = Path(getattr(dataset_path, "path", dataset_path))
    if not path.is_file():
        raise DataError(f"dataset file '{path}' does not exist; pass the JSON file the fixed trials were drawn from")
    want = getattr(trials, "dataset_sha256", None)
    if want:
        have = hashlib.sha256(path.read_bytes()).hexdigest()
        if have != want:
            raise DataError(f"dataset '{path}' has sha256 {have[:12]}…, but the fixed trials were drawn from "
                            f"sha256 {want[:12]}…; pass the dataset the trials were made from")
    return path


def _token_labels(labels) -> Optional[list]:
    return None if labels is None else [[int(i), str(tok), str(lab)] for i, tok, lab in labels]


def _eval_result(res: dict, with_intervention: bool) -> dict:
    out = {"clean_rank_list": [int(r) for r in res["clean_rank_list"]],
           "clean_topk": [[int(k), float(a)] for k, a in res["clean_topk"]]}
    if with_intervention:
        out["intervention_rank_list"] = [int(r) for r in res["intervention_rank_list"]]
        out["intervention_topk"] = [[int(k), float(a)] for k, a in res["intervention_topk"]]
    return out


def run_reference_tensors(lm, dataset_path, trials, *, reference_src, baukit=None, n_top_heads: int,
                          edit_layer: int, max_trials: Optional[int] = None, progress: bool = False,
                          sweep: bool = False) -> dict:
    """Like :func:`run_reference`, but tensors stay tensors and idx_map keys stay ints."""
    k = _check_settings(lm, trials, n_top_heads, edit_layer, max_trials)
    path = _dataset_file(dataset_path, trials)
    refs = load_reference(reference_src, baukit)
    cfg = reference_model_config(lm)
    unsupported = dict(cfg.unsupported)
    model_config = cfg.model_config
    seed, n_shots = int(trials.seed), int(trials.n_shots)
    pu, eu, ev = refs.prompt_utils, refs.extract_utils, refs.eval_utils
    # The scripts pass their argparse template, which equals these defaults.
    template = inspect.signature(pu.word_pairs_to_prompt_data).parameters
    prefixes, separators = template["prefixes"].default, template["separators"].default
    common = dict(model=lm.model, model_config=model_config, tokenizer=lm.tokenizer)

    notes = list(refs.normalizations) + list(cfg.normalizations)
    notes.append(f"dataset file {path} is symlinked as <tmp>/abstractive/{path.stem}.json for the reference's "
                 f"load_dataset(root_data_dir=<tmp>)")
    warning_notes = []
    if model_config["prepend_bos"]:
        ids = lm.tokenizer("a").input_ids
        bos = getattr(lm.tokenizer, "bos_token_id", None)
        if bos is None or not ids or ids[0] != bos:
            warning_notes.append(f"spec '{lm.spec.name}' says the tokenizer adds BOS (prepend_bos=True) but "
                            f"tokenizer('a') gives {ids}; the reference's token labels will be shifted by one")

    out: dict = {key: None for key in RESULT_STAGES}
    timings: dict = {}
    invalid = {"m4": None}
    probe = None
    rec = _Recorder()
    ds = None
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fvkit-ref-data-") as root, contextlib.ExitStack() as stack:
        _link_dataset(path, Path(root))
        stack.enter_context(_process_state_kept())
        stack.enter_context(torch.set_grad_enabled(False))
        stack.enter_context(_reference_warnings_hidden())
        _install_recorders(stack, refs, rec, progress)
        set_seed = refs.model_utils.set_seed

        def stage(key: str, prompt_stage: Optional[str], fn):
            if key in unsupported:
                return None
            rec.begin(prompt_stage)
            t0 = time.perf_counter()
            try:
                value = fn()
            except FvkitError:
                raise
            except Exception as err:
                raise ReferenceStageError(f"the reference's {key} stage failed on model '{getattr(lm, 'name', '?')}' "
                                          f"({type(err).__name__}: {err}); see the chained traceback") from err
            finally:
                rec.begin(None)
                timings[key] = round(time.perf_counter() - t0, 4)
            out[key] = value
            return value

        if "m1" not in unsupported:
            set_seed(seed)
            ds = pu.load_dataset(path.stem, root_data_dir=root, test_size=float(trials.test_size), seed=seed)

            def mean_activations():
                set_seed(seed)
                return eu.get_mean_head_activations(ds, **common, n_icl_examples=n_shots, N_TRIALS=k,
                                                    prefixes=prefixes, separators=separators, filter_set=None)

            def indirect_effect():
                set_seed(seed)
                return refs.compute_indirect_effect.compute_indirect_effect(
                    ds, out["mean_activations"], **common, n_shots=n_shots, n_trials=k, last_token_only=True,
                    prefixes=prefixes, separators=separators, filter_set=None)

            fv_pair = {}

            def top_heads():
                fv, heads = eu.compute_function_vector(out["mean_activations"], out["indirect_effect"], lm.model,
                                                       model_config=model_config, n_top_heads=n_top_heads)
                fv_pair["fv"] = fv
                return [[int(l), int(h), float(s)] for l, h, s in heads]

            def evaluation(shots: int, shuffle: bool, layer: int = edit_layer):
                def run():
                    set_seed(seed)
                    kwargs = {"shuffle_labels": True} if shuffle else {}
                    return _eval_result(ev.n_shot_eval(dataset=ds, fv_vector=out["function_vector"],
                                                       edit_layer=layer, n_shots=shots, **common,
                                                       filter_set=None, prefixes=prefixes, separators=separators,
                                                       **kwargs), True)
                return run

            def baseline():
                set_seed(seed)
                return _eval_result(ev.n_shot_eval_no_intervention(ds, n_shots=n_shots, **common, prefixes=prefixes,
                                                                   separators=separators), False)

            stage("mean_activations", "mean_activations", mean_activations)
            stage("indirect_effect", "indirect_effect", indirect_effect)
            stage("top_heads", None, top_heads)
            if out["top_heads"] is not None and "function_vector" not in unsupported:
                out["function_vector"] = fv_pair["fv"]
            if out["function_vector"] is not None:
                zero_shot_data = pu.word_pairs_to_prompt_data(
                    {"input": [], "output": []}, query_target_pair=ds["test"][0],
                    prepend_bos_token=not model_config["prepend_bos"], prefixes=prefixes, separators=separators)
                probe = probe_injection(refs, lm, model_config, out["function_vector"], edit_layer,
                                        pu.create_prompt(zero_shot_data))
                if probe["invalid_reason"]:
                    invalid["m4"] = probe["invalid_reason"] + "; the reference's zero_shot/shuffled intervention " \
                                                              "numbers are reported but must not be compared"
            def layer_sweep():
                # evaluate_function_vector.py with --edit_layer -1: set_seed(seed) before
                # each layer's zero-shot and shuffled evaluation, layers 0..n_layers-1.
                out_sweep = {"zero_shot": [], "shuffled": []}
                for layer in range(int(model_config["n_layers"])):
                    for name, shots, shuffle in (("zero_shot", 0, False), ("shuffled", n_shots, True)):
                        out_sweep[name].append(evaluation(shots, shuffle, layer)())
                return out_sweep

            stage("zero_shot", "zero_shot", evaluation(0, False))
            stage("shuffled", "shuffled", evaluation(n_shots, True))
            stage("baseline", "baseline", baseline)
            if sweep and out["function_vector"] is not None:
                stage("layer_sweep", None, layer_sweep)

    split = split_from_calls(rec.split_calls)
    if ds is not None and split is not None:
        rows = json.loads(path.read_text())
        mism = split_row_mismatches(ds, rows, split)
        if mism:
            warning_notes.append(f"the reference's loaded dataset differs from the file's text (pandas.read_json "
                            f"dtype inference), first differences: {mism}")
    elif ds is not None:
        warning_notes.append(f"expected two train_test_split calls in load_dataset, saw {len(rec.split_calls)}; "
                        f"split not recorded")
    if "m1" not in unsupported and "mean_activations" in unsupported:
        root = cfg.unsupported["mean_activations"]
        unsupported["m1"] = ("token labels, dummy labels and idx_map come from the first mean_activations prompt, "
                             "and that stage is unsupported: " + root)

    token_ids = None
    if rec.label_prompt is not None:
        token_ids = [int(t) for t in lm.tokenizer(rec.label_prompt).input_ids]
    m1 = {
        "prompts": {s: rec.prompts[s] for s in PROMPT_STAGES if s in rec.prompts},
        "token_labels": _token_labels(rec.token_labels),
        "token_ids": token_ids,
        "dummy_labels": None if rec.dummy_labels is None else [[int(i), str(lab)] for i, lab in rec.dummy_labels],
        "idx_map": None if rec.idx_map is None else {int(a): int(b) for a, b in rec.idx_map.items()},
        "idx_avg": None if rec.idx_avg is None else {str(lab): [int(a), int(b)] for lab, (a, b) in rec.idx_avg.items()},
        "split": split,
    }
    timings["total"] = round(time.perf_counter() - t_all, 4)
    ref_state = checkout_state(refs.src, "src")
    bk_state = checkout_state(refs.baukit_dir, refs.baukit_dir.name)
    meta = {
        "runner": "reference",
        "model": getattr(lm, "name", None),
        "spec": lm.spec.name,
        "versions": {p: _version(p) for p in ("transformers", "torch", "numpy", "pandas", "scikit-learn", "tokenizers")},
        "transformers": _version("transformers"),
        "torch": _version("torch"),
        "reference_src": str(refs.src),
        "reference_commit": ref_state["commit"],
        "reference_src_matches_commit": ref_state["matches_commit"],
        "baukit_path": str(refs.baukit_dir),
        "baukit_commit": bk_state["commit"],
        "settings": {
            "trials_id": getattr(trials, "id", None), "dataset": str(path),
            "dataset_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "seed": seed, "n_shots": n_shots, "n_trials": int(trials.n_trials), "test_size": float(trials.test_size),
            "max_trials": max_trials, "trials_used": k, "n_top_heads": n_top_heads, "edit_layer": edit_layer,
            "layer_sweep": bool(sweep), "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(lm.model.parameters()).device),
        },
        "model_config": model_config,
        "reference_branch": cfg.branch,
        "normalizations": notes,
        "recorded_in": rec.patched,
        "unsupported": unsupported,
        "invalid": invalid,
        "injection_probe": probe,
        "warnings": warning_notes,
        "timings": timings,
    }
    return {"meta": meta, "m1": m1, **out}


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


# --------------------------------------------------------------------------------------
# Command line (manual use)
# --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity_tests.reference",
                                description="Run the reference function_vectors code on a fvkit-loaded model "
                                            "and write the comparable result dict as JSON.")
    p.add_argument("--model", required=True, help="model alias, id or local directory (fvkit.models.loader.load_model)")
    p.add_argument("--model-spec", default=None, help="ModelSpec name, when it cannot be inferred")
    p.add_argument("--dataset", required=True, help="task dataset JSON file")
    p.add_argument("--fixed-trials", default=None, help="fixed-trials file; without it, trials are drawn from "
                                                        "--n-trials/--n-shots/--seed")
    p.add_argument("--n-trials", type=int, default=10)
    p.add_argument("--n-shots", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-src", default=os.environ.get("FVKIT_REFERENCE_SRC"),
                   help="function_vectors checkout (folder holding src/); default $FVKIT_REFERENCE_SRC")
    p.add_argument("--baukit", default=os.environ.get("FVKIT_BAUKIT"),
                   help="baukit checkout; default $FVKIT_BAUKIT or the installed baukit")
    p.add_argument("--max-trials", type=int, default=None)
    p.add_argument("--n-top-heads", type=int, default=10)
    p.add_argument("--edit-layer", type=int, required=True)
    p.add_argument("--sweep", action="store_true", help="also evaluate with the vector at every layer "
                                                        "(the reference's --edit_layer -1)")
    p.add_argument("--progress", action="store_true", help="show the reference's progress bars")
    p.add_argument("--out", required=True, help="where to write the result JSON (written atomically)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.reference_src:
            raise FvkitError("no reference checkout given; pass --reference-src PATH or set FVKIT_REFERENCE_SRC")
        from fvkit.method.data import atomic_write_text, load_task_dataset
        from fvkit.method.fixed_trials import FixedTrials
        from fvkit.models.loader import load_model

        load_reference(args.reference_src, args.baukit)  # a wrong path fails before the model loads
        dataset = load_task_dataset(args.dataset)
        if args.fixed_trials:
            trials = FixedTrials.load(args.fixed_trials, dataset)
        else:
            trials = FixedTrials.make(dataset, n_trials=args.n_trials, n_shots=args.n_shots, seed=args.seed)
        lm = load_model(args.model, model_spec=args.model_spec)
        result = run_reference(lm, dataset.path, trials, reference_src=args.reference_src, baukit=args.baukit,
                               n_top_heads=args.n_top_heads, edit_layer=args.edit_layer,
                               max_trials=args.max_trials, progress=args.progress, sweep=args.sweep)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    except FvkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = result["meta"]
    print(f"wrote {args.out}: reference {meta['reference_commit'][:12]}, transformers {meta['transformers']}, "
          f"{meta['timings']['total']:.1f}s")
    for key, reason in meta["unsupported"].items():
        print(f"  unsupported {key}: {reason}")
    if meta["invalid"]["m4"]:
        print(f"  M4 invalid: {meta['invalid']['m4']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
