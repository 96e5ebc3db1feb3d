"""``fvkit run``'s device options: where the model runs, in what precision, on how many threads.

    fvkit run --model tiny-llama                                   # parity setting: CPU, float32, all cores
    fvkit run --model big/model --device cuda --dtype bfloat16
    fvkit run --model big/model --device cuda --dtype float16 --device-map auto \\
        --max-memory 0=20GiB,cpu=60GiB --offload-dir /tmp/offload
    fvkit run --model big/model --device cuda --quant 4bit --threads 4

Without any of ``--device/--dtype/--device-map/--max-memory/--offload-dir/--quant``
a run uses the parity setting (CPU, float32, the model whole in memory): its
numbers are the ones the parity suite compares with the reference. Any of them
leaves parity mode; every choice is checked against this machine before the
model is read (:mod:`fvkit.models.placement`).

Threads: a single run uses every core (``os.cpu_count()``) unless ``--threads``
says otherwise; pytest workers keep their one thread (``parity_tests/conftest.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from fvkit.errors import FvkitError
from fvkit.models.parity_setting import PARITY_DEVICE, PARITY_DTYPE, PARITY_QUANT
from fvkit.models.placement import DEVICE_MAPS, QUANTS, Placement, dtype_name

#: The options that leave parity mode, with the value that keeps it.
PLACEMENT_OPTIONS = {"device": PARITY_DEVICE, "dtype": PARITY_DTYPE, "quant": PARITY_QUANT,
                     "device_map": None, "max_memory": None, "offload_dir": None}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_device_group(parser) -> None:
    """The ``device`` argument group of a command that loads a model and computes on it."""
    group = parser.add_argument_group("device", "where the model runs (any of these but --threads leaves parity mode)")
    group.add_argument("--device", default=None, help=f"torch device: cpu, cuda, cuda:1, mps (default: {PARITY_DEVICE})")
    group.add_argument("--dtype", default=None,
                       help=f"weights dtype: {', '.join(DTYPE_CHOICES)} (or fp32, bf16, fp16; default: float32)")
    group.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                       help="spread the model over the GPUs, then CPU memory, then disk with accelerate")
    group.add_argument("--max-memory", default=None,
                       help="memory per device for --device-map, e.g. 0=20GiB,1=20GiB,cpu=60GiB")
    group.add_argument("--offload-dir", default=None, help="folder for the weights --device-map offloads to disk")
    group.add_argument("--quant", default=None, choices=QUANTS,
                       help=f"bitsandbytes quantization, on CUDA (default: {PARITY_QUANT})")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: every core of this machine, os.cpu_count())")


def placement_kwargs(args) -> dict:
    """``load_model`` keywords from the options; ``parity`` is True when none of them was given."""
    given = {name: getattr(args, name, None) for name in PLACEMENT_OPTIONS}
    parity = all(value is None for value in given.values())
    kwargs = {name: (default if given[name] is None else given[name]) for name, default in PLACEMENT_OPTIONS.items()}
    kwargs["dtype"] = dtype_name(kwargs["dtype"])
    if parity is False and kwargs == PLACEMENT_OPTIONS | {"dtype": PARITY_DTYPE}:
        parity = True  # the parity values spelled out (--device cpu --dtype float32) still mean parity
    # Checked here too, so that a CUDA device, bitsandbytes or a half-precision kernel this
    # machine lacks is named before the dataset and trials are read, not after.
    Placement.from_options(**kwargs).check()
    return {**kwargs, "parity": parity}


def thread_count(requested) -> int:
    """``requested`` torch threads, checked, or every core of this machine."""
    if requested is None:
        return os.cpu_count() or 1
    if int(requested) < 1:
        raise FvkitError(f"--threads must be at least 1, got {requested}")
    return int(requested)


@contextlib.contextmanager
def using_threads(requested):
    """Run the ``with`` body on ``thread_count(requested)`` torch threads; the earlier count
    comes back afterwards, so a command run inside a one-thread pytest worker leaves it so."""
    before = torch.get_num_threads()
    torch.set_num_threads(thread_count(requested))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def with_threads(command):
    """``command(args)`` run under ``--threads`` (see :func:`using_threads`)."""
    @functools.wraps(command)
    def run(args):
        with using_threads(getattr(args, "threads", None)):
            return command(args)
    return run
