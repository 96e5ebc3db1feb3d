"""Where a model's modules run, and how fvkit's own tensors get there.

    settings = Placement.from_options(device="cuda", dtype="bfloat16", device_map="auto",
                                      max_memory="0=20GiB,cpu=60GiB", offload_dir="/tmp/off")
    settings.check()                                  # clear errors before any weight is read
    module_device(o_proj), module_dtype(o_proj)       # where the module computes, in what dtype
    x = to_module(x, o_proj)                          # a tensor fvkit made, ready for that module

Outside parity mode a model may sit on a GPU, in half precision, quantized, or
spread by accelerate over several devices with part of it offloaded to CPU
memory or disk (``device_map="auto"`` with ``max_memory``). Module inputs that
come from the model itself are moved by accelerate's hooks; what fvkit creates
on its own (head patches, the function vector, the out-projection input of one
head) must be put on the device and dtype of the module that reads it. An
offloaded module's parameters live on the ``meta`` device between calls, so
the device is taken from accelerate's hook (its execution device), not from the
parameters.

Tokenized prompts are made on the CPU. A model placed whole on another device
gets :func:`follow_model_inputs`, a pre-hook that moves tensor inputs to the
input embedding's device; a dispatched model has accelerate's own hook for that.
Parity mode (CPU, float32, no map) installs nothing, so its numbers are the ones
it always computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fvkit.errors import FvkitError

#: Short dtype names (fvkit's, as run.json and the parity settings spell them) -> torch dtypes.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Every accepted spelling -> the short name.
DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "float": "fp32",
                 "fp16": "fp16", "float16": "fp16", "half": "fp16",
                 "bf16": "bf16", "bfloat16": "bf16"}
QUANTS = ("none", "8bit", "4bit")
#: accelerate's strategies for ``device_map``; ``auto`` fills the GPUs in order, then CPU, then disk.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def dtype_name(value: str) -> str:
    """The short name of a dtype spelling (``bfloat16`` -> ``bf16``); unknown ones name the choices."""
    key = str(value).strip().lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise FvkitError(f"unknown dtype '{value}'; choose one of fp32, fp16, bf16 "
                         f"(or float32, float16, bfloat16)")
    return DTYPE_ALIASES[key]


def parse_max_memory(text: Optional[str]) -> Optional[dict]:
    """``"0=20GiB,1=20GiB,cpu=60GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "60GiB"}`` (bytes as ints)."""
    if text is None or isinstance(text, dict):
        return text
    out = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, sep, size = part.partition("=")
        key = key.strip().lower()
        if not sep or not _MEMORY.match(size):
            raise FvkitError(f"--max-memory entry {part!r} is not DEVICE=SIZE; write e.g. "
                             f"'0=20GiB,cpu=60GiB' (GPU index or cpu, size in B, KB, MB, GB, KiB, MiB, GiB)")
        if key.startswith("cuda:"):
            key = key[5:]
        if key.isdigit():
            key = int(key)
        elif key not in ("cpu", "mps", "disk"):
            raise FvkitError(f"--max-memory names device {key!r}; use a GPU index (0, 1, ...), cpu or mps")
        number, unit = _MEMORY.match(size).groups()
        out[key] = int(float(number)) if unit is None else f"{number}{unit}"
    if not out:
        raise FvkitError("--max-memory is empty; write e.g. '0=20GiB,cpu=60GiB'")
    return out


@dataclass(frozen=True)
class Placement:
    """Device, dtype, quantization and accelerate's placement options of one model load."""

    device: str = "cpu"
    dtype: str = "fp32"
    quant: str = "none"
    device_map: Optional[str] = None
    max_memory: Optional[dict] = None
    offload_dir: Optional[str] = None

    @classmethod
    def from_options(cls, device: str = "cpu", dtype: str = "fp32", quant: str = "none",
                     device_map: Optional[str] = None, max_memory=None, offload_dir: Optional[str] = None):
        return cls(device=str(device).strip(), dtype=dtype_name(dtype), quant=str(quant).strip().lower(),
                   device_map=device_map, max_memory=parse_max_memory(max_memory),
                   offload_dir=None if offload_dir is None else str(offload_dir))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def check(self) -> None:
        """Every setting against this machine, before any weight is read; one message per mistake."""
        if self.quant not in QUANTS:
            raise FvkitError(f"unknown quant '{self.quant}'; choose one of {', '.join(QUANTS)}")
        check_device(self.device)
        check_dtype_on_device(self.dtype, self.device)
        if self.quant != "none":
            check_quantization(self.quant, self.device)
        if self.device_map is None:
            if self.max_memory is not None or self.offload_dir is not None:
                raise FvkitError("--max-memory and --offload-dir place a model spread by accelerate; "
                                 "add --device-map auto")
            return
        if self.device_map not in DEVICE_MAPS:
            raise FvkitError(f"unknown --device-map '{self.device_map}'; use one of {', '.join(DEVICE_MAPS)}")
        check_accelerate()
        gpus = sorted(key for key in (self.max_memory or {}) if isinstance(key, int))
        n_gpus = torch.cuda.device_count()
        if gpus and gpus[-1] >= n_gpus:
            raise FvkitError(f"--max-memory gives memory to GPU {gpus[-1]}, but this machine has "
                             f"{n_gpus} CUDA GPU(s); name only GPUs 0..{n_gpus - 1}" if n_gpus else
                             f"--max-memory gives memory to GPU {gpus[-1]}, but torch sees no CUDA GPU here; "
                             f"give memory to cpu (and disk through --offload-dir) only")
        if self.offload_dir is not None:
            path = Path(self.offload_dir)
            if path.exists() and not path.is_dir():
                raise FvkitError(f"--offload-dir {path} is a file; name a folder (it is created if absent)")

    def from_pretrained_kwargs(self) -> dict:
        """The placement part of ``from_pretrained``'s arguments (dtype and quantization apart)."""
        if self.device_map is None:
            return {}
        kwargs = {"device_map": self.device_map}
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        if self.offload_dir is not None:
            kwargs["offload_folder"] = self.offload_dir
        return kwargs


def check_device(device: str) -> None:
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise FvkitError(f"unknown device '{device}'; use e.g. cpu, cuda, cuda:1 or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise FvkitError(f"device '{device}' is not available on this machine (torch {torch.__version__} sees no "
                         f"CUDA GPU: a CPU-only build or no driver); use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise FvkitError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FvkitError(f"device '{device}' is not available on this machine ({reason}); "
                         f"use --device cpu") from None


def check_dtype_on_device(dtype: str, device: str) -> None:
    """A tiny matrix product and softmax in ``dtype`` on ``device``: some builds lack half kernels."""
    torch_dtype = DTYPES[dtype_name(dtype)]
    try:
        x = torch.ones(2, 4, dtype=torch_dtype, device=device)
        torch.softmax(torch.nn.functional.linear(x, x), dim=-1)
    except (RuntimeError, TypeError) as err:
        reason = str(err).strip().splitlines()[0]
        raise FvkitError(f"--dtype {dtype} is not supported on device '{device}' by torch {torch.__version__} "
                         f"({reason}); use --dtype float32, or bfloat16 on CPU") from None


def check_quantization(quant: str, device: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise FvkitError(f"quant={quant} needs the bitsandbytes package; run `pip install bitsandbytes`, "
                         f"or use --quant none") from None
    if torch.device(device).type != "cuda":
        raise FvkitError(f"--quant {quant} runs bitsandbytes' CUDA kernels; add --device cuda, or use --quant none")
    check_accelerate()


def check_accelerate() -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise FvkitError("placing a model with --device-map or --quant needs the accelerate package; "
                         "run `pip install accelerate`") from None


# --- Where modules run ------------------------------------------------------------------

def _hook_device(module: torch.nn.Module) -> Optional[torch.device]:
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        # A SequentialHook holds several; the one that places the weights has the device.
        for inner in getattr(hook, "hooks", ()) or ():
            device = getattr(inner, "execution_device", None)
            if device is not None:
                break
    if device is None:
        return None
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device when it has one
    (an offloaded module's weights sit on ``meta`` between calls), else its first real
    parameter's or buffer's, else the CPU."""
    device = _hook_device(module)
    if device is not None:
        return device
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def module_dtype(module: torch.nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype ``module`` computes in: its weight's when that is floating (an offloaded one
    keeps its dtype on ``meta``), else ``default`` (a quantized layer stores integers)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    if weight is None:
        for tensor in module.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
    return default


def to_module(tensor: torch.Tensor, module: torch.nn.Module, default_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``tensor`` on the device ``module`` computes on, in the dtype it computes in."""
    return tensor.to(device=module_device(module), dtype=module_dtype(module, default_dtype))


def to_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` on ``like``'s device and in its dtype, to be written into it."""
    return value.to(device=like.device, dtype=like.dtype)


def is_dispatched(model: torch.nn.Module) -> bool:
    """Whether accelerate spread ``model`` over devices (its hooks then move every input)."""
    return bool(getattr(model, "hf_device_map", None)) and hasattr(model, "_hf_hook")


def device_map_summary(model: torch.nn.Module) -> Optional[dict]:
    """accelerate's module -> device map of a dispatched model (JSON-ready), else None."""
    mapping = getattr(model, "hf_device_map", None)
    if not mapping:
        return None
    return {name: (f"cuda:{dev}" if isinstance(dev, int) else str(dev)) for name, dev in mapping.items()}


def missing_offloaded_weights(model: torch.nn.Module) -> list:
    """Offloaded parameters accelerate has no stored copy of (it would fail when their module runs).

    transformers 4.x writes no offloaded copy of a weight the output head shares with
    the input embedding (GPT-2's ``lm_head.weight``), so the head's first call raises a
    KeyError deep inside accelerate; the names are read from the offload index alone,
    without loading any weight.
    """
    missing = []
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if not getattr(hook, "offload", False) or weights is None:
            continue
        prefix = getattr(weights, "prefix", "")
        stored = set(getattr(getattr(weights, "dataset", weights), "all_keys", ()))
        if not stored:
            continue
        recurse = bool(getattr(hook, "place_submodules", False))
        for param_name, _ in module.named_parameters(recurse=recurse):
            if prefix + param_name not in stored:
                missing.append(f"{name}.{param_name}" if name else param_name)
    return missing


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids must be for ``model``: its input embedding's device."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    return module_device(embedding if embedding is not None else model)


class _InputsToDevice:
    """Forward pre-hook moving every tensor argument to one device (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def _move(self, value):
        if isinstance(value, torch.Tensor):
            return value.to(self.device)
        if isinstance(value, (tuple, list)):
            return type(value)(self._move(v) for v in value)
        return value

    def __call__(self, module, args, kwargs):
        return self._move(args), {k: self._move(v) for k, v in kwargs.items()}


def follow_model_inputs(model: torch.nn.Module):
    """Make CPU-tokenized inputs reach a model placed whole on another device.

    Nothing is installed for a CPU model or a dispatched one (accelerate's own top-level
    hook moves inputs there); returns the hook handle or None.
    """
    device = input_device(model)
    if device.type == "cpu" or is_dispatched(model):
        return None
    return model.register_forward_pre_hook(_InputsToDevice(device), with_kwargs=True)
