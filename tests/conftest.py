"""Shared fixtures of the unit tests: tokenizers and tiny zoo models, built once per session."""

from __future__ import annotations

import os

import pytest

# Progress bars only clutter captured test output.
os.environ.setdefault("FVKIT_PROGRESS", "0")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from fvkit.tokenizers import GPT2_BPE, build_tokenizer
    return build_tokenizer(GPT2_BPE)


@pytest.fixture(scope="session")
def sp_tokenizer():
    from fvkit.tokenizers import LLAMA_SP, build_tokenizer
    return build_tokenizer(LLAMA_SP)


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model("tiny-gpt2")``: a zoo model loaded once per session (CPU, fp32)."""
    from fvkit.hf_loader import load_model
    cache = {}

    def get(alias: str):
        if alias not in cache:
            cache[alias] = load_model(alias)
        return cache[alias]

    return get


@pytest.fixture(scope="session")
def antonym():
    from fvkit.data import load_task_dataset
    return load_task_dataset("antonym")


@pytest.fixture(scope="session")
def antonym_trials(antonym):
    from fvkit.fixed_trials import FixedTrials
    from fvkit.cli_pipeline import DEFAULT_TRIALS_DIR
    return FixedTrials.load(DEFAULT_TRIALS_DIR / "fixed_trials_antonym_t10_s10_seed0.json", antonym)
