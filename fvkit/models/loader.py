"""Load a causal language model with its tokenizer, spec and dimensions.

    lm = load_model("tiny-llama")                  # zoo alias
    lm = load_model("/path/to/checkpoint")         # local directory
    lm = load_model("gpt2", device="cuda", dtype="fp16", parity=False)
    print(lm.diagnostics_table())
    d = describe_model("tiny-llama")               # spec and dimensions from the config, no weights

The spec is chosen by: an explicit ``model_spec`` name, else the zoo entry's
(or an exported zoo directory's) spec, else :func:`fvkit.models.spec.find_spec`
on the model id and ``config.architectures``. After loading, the blocks,
attention modules and out-projections of every layer are resolved, so a spec
that does not fit fails here, naming the path, before any pipeline code runs.

Parity mode (the default) reproduces the reference's numbers only on CPU in
float32 without quantization; anything else is refused with
:class:`fvkit.errors.ParityModeError`.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from fvkit.models import adapters, zoo
from fvkit.errors import FvkitError, ParityModeError, SpecError
from fvkit.models.config import ModelDims, dims_from_config
from fvkit.models.parity_setting import PARITY_DEVICE, PARITY_DTYPE, PARITY_QUANT
from fvkit.models.spec import ModelSpec, find_spec, get_spec
from fvkit.models.tokenizers import adds_bos

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
QUANTS = ("none", "8bit", "4bit")

#: How many models :func:`load_model` has loaded in this process (tests use it to
#: check that a session shares its models instead of reloading them).
LOAD_COUNT = 0


def load_count() -> int:
    return LOAD_COUNT


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained`` keyword for the weights' dtype (renamed in transformers 4.56)."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


@dataclass
class LoadedModel:
    """A model ready for the pipeline, with everything needed to describe it.

        lm = load_model("tiny-gpt2")
        ids = lm.tokenizer("Q: hot\\nA:", return_tensors="pt")
        logits = lm.model(**ids).logits
        lm.dims.n_heads, lm.spec.name, lm.diagnostics()["weights_sha256"]
    """

    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    dims: ModelDims
    name: str
    source: str
    device: str = "cpu"
    dtype: str = "fp32"
    quant: str = "none"
    weights_sha256: Optional[str] = None
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def out_proj_names(self) -> list:
        return [adapters.out_proj_name(self.spec, layer) for layer in range(self.dims.n_layers)]

    def block_names(self) -> list:
        return [adapters.block_name(self.spec, layer) for layer in range(self.dims.n_layers)]

    def tokenizer_adds_bos(self) -> bool:
        return adds_bos(self.tokenizer)

    def diagnostics(self) -> dict:
        import transformers

        layers = []
        for layer in range(self.dims.n_layers):
            module = adapters.resolve_out_proj(self.model, self.spec, layer)
            layers.append({
                "layer": layer,
                "out_proj": adapters.out_proj_name(self.spec, layer),
                "out_proj_class": type(module).__name__,
                "out_proj_in_features": adapters.out_proj_in_features(module),
            })
        return {
            "name": self.name,
            "source": self.source,
            "model_class": type(self.model).__name__,
            "spec": self.spec.name,
            "dims": self.dims.as_dict(),
            "layers": layers,
            "tokenizer_class": type(self.tokenizer).__name__,
            "spec_prepend_bos": self.spec.prepend_bos,
            "tokenizer_adds_bos": self.tokenizer_adds_bos(),
            "bos_text": self.spec.bos_text,
            "dtype": self.dtype,
            "device": self.device,
            "quant": self.quant,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "weights_sha256": self.weights_sha256,
            "load_seconds": round(self.load_seconds, 2),
        }

    def diagnostics_table(self) -> str:
        d = self.diagnostics()
        dims = d["dims"]
        rows = [
            ("model", f"{d['name']} ({d['model_class']})"),
            ("source", d["source"]),
            ("spec", d["spec"]),
            ("layers / heads / kv heads", f"{dims['n_layers']} / {dims['n_heads']} / {dims['n_kv_heads']}"),
            ("head_dim / hidden / vocab", f"{dims['head_dim']} / {dims['hidden_size']} / {dims['vocab_size']}"),
            ("tokenizer", d["tokenizer_class"]),
            ("BOS policy", f"spec prepend_bos={d['spec_prepend_bos']}, tokenizer adds BOS: "
                           f"{'yes' if d['tokenizer_adds_bos'] else 'no'}, bos_text={d['bos_text']!r}"),
            ("dtype / device / quant", f"{d['dtype']} / {d['device']} / {d['quant']}"),
            ("transformers / torch", f"{d['transformers']} / {d['torch']}"),
            ("weights sha256", d["weights_sha256"] or "(not a zoo model)"),
            ("load time", f"{d['load_seconds']} s"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        path_width = max(len(x["out_proj"]) for x in d["layers"])
        lines.append("")
        lines.append(f"{'layer':<5}  {'out-projection':<{path_width}}  class (input features)")
        for x in d["layers"]:
            lines.append(f"{x['layer']:<5}  {x['out_proj']:<{path_width}}  "
                         f"{x['out_proj_class']} ({x['out_proj_in_features']})")
        return "\n".join(lines)


def check_parity_settings(device: str, dtype: str, quant: str) -> None:
    """Refuse, with the fix, any setting under which the reference's numbers differ."""
    wrong = [(name, value, fix) for name, value, fix in (
        ("device", device, PARITY_DEVICE), ("dtype", dtype, PARITY_DTYPE), ("quant", quant, PARITY_QUANT))
        if value != fix]
    if wrong:
        name, value, fix = wrong[0]
        raise ParityModeError(
            f"parity mode needs {name}={fix}, got {name}={value}: parity with the reference is "
            f"defined for CPU float32 without quantization; pass --{name} {fix}, or leave parity "
            f"mode (parity=False) for exploratory runs"
        )


def _check_settings(device: str, dtype: str, quant: str) -> None:
    if dtype not in DTYPES:
        raise FvkitError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if quant not in QUANTS:
        raise FvkitError(f"unknown quant '{quant}'; choose one of {', '.join(QUANTS)}")
    try:
        torch.device(device)
    except RuntimeError:
        raise FvkitError(f"unknown device '{device}'; use e.g. cpu, cuda, cuda:1 or mps") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FvkitError(f"device '{device}' is not available on this machine ({reason}); "
                         f"use --device cpu") from None


def _resolve_source(name_or_path: str):
    """``(directory or hub id, zoo entry or None)`` for what the user named."""
    if name_or_path in zoo.ZOO:
        return zoo.ensure_built(name_or_path), zoo.ZOO[name_or_path]
    if os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path), None
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name_or_path)
    if hub_id is None or name_or_path.startswith((".", "/", "~")):
        raise FvkitError(_unknown_message(name_or_path, "it is neither a zoo alias nor a directory"))
    return name_or_path, None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection; avoids a minute of retries offline."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_config(name_or_path: str, source: str):
    from transformers import AutoConfig

    local = os.path.isdir(source)
    if not local:
        # A hub id: use the local hub cache when it has the model, else the hub itself.
        try:
            return AutoConfig.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError):
            pass
        if not _hub_reachable():
            raise FvkitError(_unknown_message(
                name_or_path, "it is not a zoo alias or directory, it is not in the local hub "
                              "cache, and the hub cannot be reached"))
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        why = ("the directory holds no loadable config.json" if local
               else "it is not a zoo alias or directory, and the hub has no such model")
        raise FvkitError(_unknown_message(name_or_path, f"{why} ({type(err).__name__})")) from None


def _unknown_message(name: str, why: str) -> str:
    return (f"cannot load model '{name}': {why}. Use a zoo alias ({', '.join(zoo.aliases())}), "
            f"a local checkpoint directory, or a reachable Hugging Face hub id")


def _pick_spec(name: str, source: str, entry, config, model_spec: Optional[str]) -> ModelSpec:
    if model_spec:
        return get_spec(model_spec)
    if entry is not None:
        return get_spec(entry.spec)
    metadata = zoo.read_metadata(source) if os.path.isdir(source) else None
    if metadata and metadata.get("spec"):
        return get_spec(metadata["spec"])
    return find_spec(name, getattr(config, "architectures", None))


def _quant_kwargs(quant: str) -> dict:
    if quant == "none":
        return {}
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FvkitError(f"quant={quant} needs the bitsandbytes package and a CUDA device; "
                         f"run `pip install bitsandbytes`, or use --quant none") from None
    if quant == "8bit":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}


def resolve_all_layers(model: torch.nn.Module, spec: ModelSpec, dims: ModelDims) -> None:
    """Resolve every layer's block, attention and out-projection, and check widths."""
    blocks = adapters.resolve_blocks(model, spec)
    if len(blocks) != dims.n_layers:
        raise SpecError(
            f"ModelSpec '{spec.name}': blocks_path='{spec.blocks_path}' holds {len(blocks)} "
            f"modules but the config says {dims.n_layers} layers; the spec points at the wrong list"
        )
    for layer in range(dims.n_layers):
        out_proj = adapters.resolve_out_proj(model, spec, layer)
        width = adapters.out_proj_in_features(out_proj)
        if width != dims.attn_width:
            raise SpecError(
                f"ModelSpec '{spec.name}': {adapters.out_proj_name(spec, layer)} reads {width} "
                f"features, not n_heads*head_dim = {dims.n_heads}*{dims.head_dim} = "
                f"{dims.attn_width}; the out_proj path or the config's head geometry is wrong"
            )
        if spec.attn_output_norm is not None:
            # A wrong norm path fails at load, not after the whole run.
            adapters.resolve_attn_output_norm(model, spec, layer)
    adapters.resolve_final_norm(model, spec)
    adapters.resolve_lm_head(model, spec)


@contextlib.contextmanager
def quiet_progress_bars():
    """Hide transformers' per-load progress bars (5.x draws one for every checkpoint)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(name_or_path: str, model_spec: Optional[str] = None, device: str = "cpu",
               dtype: str = "fp32", quant: str = "none", parity: bool = True) -> LoadedModel:
    """Load a model for fvkit (see module docstring)."""
    if parity:
        check_parity_settings(device, dtype, quant)
    _check_settings(device, dtype, quant)
    with quiet_progress_bars():
        return _load(name_or_path, model_spec, device, dtype, quant)


@dataclass(frozen=True)
class ModelDescription:
    """A model as its config describes it: where it is, its spec and its dimensions.

        d = describe_model("tiny-llama")
        d.spec.name, d.dims.n_layers, d.dims.n_heads, d.source
    """

    name: str
    source: str
    spec: ModelSpec
    dims: ModelDims
    config: object = field(repr=False, compare=False)


def describe_model(name_or_path: str, model_spec: Optional[str] = None) -> ModelDescription:
    """Spec and dimensions of a model from its config alone; no weights are loaded.

    Takes what :func:`load_model` takes (zoo alias, local directory or hub id, and an
    optional spec name), chooses the spec the same way and fails with the same
    messages: an unknown spec name, an unknown model, a directory without a
    config. A zoo alias is built into the cache first if it is not there yet.
    """
    if model_spec:
        get_spec(model_spec)  # an unknown spec name fails before anything is read
    source, entry = _resolve_source(name_or_path)
    config = _load_config(name_or_path, source)
    spec = _pick_spec(name_or_path, source, entry, config, model_spec)
    return ModelDescription(name=name_or_path, source=source, spec=spec, dims=dims_from_config(config, spec),
                            config=config)


def _load(name_or_path, model_spec, device, dtype, quant) -> LoadedModel:
    global LOAD_COUNT
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    described = describe_model(name_or_path, model_spec)
    source, spec, dims = described.source, described.spec, described.dims
    # No low_cpu_mem_usage: both transformers lines already load a safetensors checkpoint
    # without a second copy (4.49 skips the random init and keeps the parameters in the
    # memory-mapped file, 5.x builds the model on the meta device); with the flag, 4.49's
    # resident set came out the same or higher (benchmarks/bench_run_memory.py).
    # The config describe_model already read, so it is not fetched and parsed again.
    model = AutoModelForCausalLM.from_pretrained(
        source, config=described.config, attn_implementation="eager", **dtype_kwargs(DTYPES[dtype]),
        **_quant_kwargs(quant))
    if quant == "none":
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source)
    resolve_all_layers(model, spec, dims)

    digest = None
    metadata = zoo.read_metadata(source) if os.path.isdir(source) else None
    if metadata and metadata.get("weights_sha256") and dtype == "fp32" and quant == "none":
        digest = zoo.weights_sha256(model)
        if digest != metadata["weights_sha256"]:
            raise FvkitError(
                f"model '{name_or_path}' at {source} has weights hash {digest[:16]}... but was "
                f"saved with {metadata['weights_sha256'][:16]}...; the files are damaged. "
                f"Delete {source} and load it again to rebuild it"
            )
    LOAD_COUNT += 1
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, dims=dims, name=name_or_path,
                       source=source, device=device, dtype=dtype, quant=quant,
                       weights_sha256=digest, load_seconds=time.time() - start)
