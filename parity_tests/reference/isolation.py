"""Keeping the reference's side effects out of the calling process.

The reference's ``set_seed`` reseeds every global RNG, sets cudnn flags and
``PYTHONHASHSEED``, and its modules raise deprecation warnings; a test session
that runs it must come out as it went in.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings

import numpy as np
import torch


@contextlib.contextmanager
def reference_warnings_hidden():
    """Deprecation noise from the reference's own code (invalid escapes, numpy 2's copy
    keyword) says nothing about fvkit; keep it out of test reports."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", SyntaxWarning)
        yield


@contextlib.contextmanager
def process_state_kept():
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
