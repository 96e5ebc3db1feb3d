"""Fixtures of the parity gates: one session, each model loaded and computed once.

    pytest parity_tests --model tiny-llama --max-trials 1 --n-top-heads 5 --edit-layer 1
    pytest parity_tests --reference-src /tmp/ref/function_vectors --baukit /tmp/ref/baukit   # live reference too

The options, ordering, --fail-fast and the report come from the ``fvkit_parity``
plugin (:mod:`fvkit.parity.plugin`); this file builds the
:class:`~fvkit.parity.session.ParitySession` at startup (a bad dataset, trials
file or model name ends pytest with a one-line usage error), parametrizes the
gates over the models at collection (a setting a model cannot take is a
collection error naming the valid range) and hands the gates their inputs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from fvkit.errors import FvkitError, UnsupportedReleaseError
from fvkit.parity.options import REFERENCE_TRANSFORMERS
from fvkit.parity.gate_runner import GateContext, Recorder, reference_environment
from fvkit.parity.plugin import OPTIONS_KEY, keep_unused_snapshots, options, report_state
from fvkit.parity.registry import param_id
from fvkit.parity.session import ParitySession, model_id

# Progress bars only clutter captured output.
os.environ.setdefault("FVKIT_PROGRESS", "0")

SESSION_KEY = pytest.StashKey[ParitySession]()
REPORTED_KEY = pytest.StashKey[set]()
#: model -> why it cannot be loaded here; its own gates fail with that, the rest of the run goes on.
UNAVAILABLE_KEY = pytest.StashKey[dict]()
#: model -> why the installed transformers release cannot build it; its gates are skipped with that.
UNSUPPORTED_KEY = pytest.StashKey[dict]()
HERE = Path(__file__).resolve().parent
#: How to create missing snapshots (quoted in every "no snapshot" skip).
SNAPSHOT_HINT = ("create them from a live reference under the model's own transformers release (the reference's pin "
                 f"{REFERENCE_TRANSFORMERS} unless its architecture names another): pytest parity_tests <same settings> "
                 "--reference-src PATH --baukit PATH --snapshot-update, or tox -e reference")


def load_reference_runner():
    """``run_reference`` from the reference/ package beside this file, imported by path
    so that no other ``reference`` module on sys.path can stand in for it."""
    name = "fvkit_parity_reference_runner"
    if name not in sys.modules:
        package = HERE / "reference"
        spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                      submodule_search_locations=[str(package)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].run_reference


def torch_threads(requested: Optional[int]) -> int:
    """Threads per process: one unless --torch-threads says otherwise. The tiny models'
    matrix products are too small to gain from more, and with any other load on the
    CPU (or xdist workers beside it) OpenMP threads wait on each other: measured on
    two cores, the default suite took 12 min with two threads and 2 min with one."""
    return requested or 1


def pytest_configure(config: pytest.Config) -> None:
    import torch

    if not plugin_active(config):
        raise pytest.UsageError("fvkit parity: the parity plugin is not active in this run; run pytest from the "
                                "fvkit checkout (its conftest.py switches it on) or add -p fvkit.parity.switch")
    keep_unused_snapshots(config)
    opts = options(config)
    torch.set_num_threads(torch_threads(opts.torch_threads))
    try:
        ps = ParitySession.create(opts, config.rootpath,
                                  reference_runner=load_reference_runner() if opts.reference_src else None)
    except FvkitError as err:
        raise pytest.UsageError(f"fvkit parity: {err}") from None
    unavailable, unsupported = {}, {}
    for name in ps.model_names:
        try:
            ps.model_info(name)
        except UnsupportedReleaseError as err:
            # Not a fault of the set-up: this release cannot build the model at all, so
            # there is nothing to compare here (the other transformers line checks it).
            unsupported[name] = f"fvkit parity: {err}"
        except FvkitError as err:
            # Only this model's gates fail (at setup, with this message); the unit tests
            # and the other models' gates of the same run go on.
            unavailable[name] = f"fvkit parity: {err}"
    config.stash[SESSION_KEY] = ps
    config.stash[UNAVAILABLE_KEY] = unavailable
    config.stash[UNSUPPORTED_KEY] = unsupported
    config.stash[REPORTED_KEY] = set()
    report_state(config).bind(ps.dataset.name, ps.trials.id, ps.describe(),
                              notes=ps.notes + left_out_notes(ps, {**unavailable, **unsupported}))


def plugin_active(config: pytest.Config) -> bool:
    return OPTIONS_KEY in config.stash


def parity_session(config: pytest.Config) -> ParitySession:
    return config.stash[SESSION_KEY]


def unavailable_models(config: pytest.Config) -> dict:
    return config.stash[UNAVAILABLE_KEY]


def unsupported_models(config: pytest.Config) -> dict:
    return config.stash[UNSUPPORTED_KEY]


# --- parametrization -------------------------------------------------------------------
@dataclass(frozen=True)
class SpecCase:
    """One registered spec and the model its M5 gate runs on.

        SpecCase("llama", "tiny-llama", selected=True)    # a --model: also runs the reduced run
    """

    spec: str
    model: Optional[str]
    selected: bool = False
    skip: str = ""

    @property
    def model_key(self) -> str:
        return model_id(self.model) if self.model else f"spec-{self.spec}"


def spec_cases(ps: ParitySession, unavailable: Optional[dict] = None) -> list:
    """Every registered spec, on the --model models it serves, else its zoo model
    (``unavailable``: --model models that cannot be loaded, left out)."""
    unavailable = unavailable or {}
    from fvkit.models import zoo
    from fvkit.models.spec import all_specs

    by_spec: dict = {}
    for name in ps.model_names:
        if name not in unavailable:
            by_spec.setdefault(ps.model_info(name).spec, []).append(name)
    preferred = list(zoo.DEFAULT_PARITY_MODELS) + [a for a in zoo.ZOO if a not in zoo.DEFAULT_PARITY_MODELS]
    # A --model loaded under --model-spec stands for that spec only; it cannot also be
    # the zoo model on which its own spec is checked.
    forced = set(ps.model_names) if ps.options.model_spec else set()
    cases = []
    for spec in all_specs():
        if spec.name in by_spec:
            cases.extend(SpecCase(spec.name, name, selected=True) for name in by_spec[spec.name])
            continue
        alias = next((a for a in preferred if zoo.ZOO[a].spec == spec.name and a not in forced), None)
        taken = next((a for a in preferred if zoo.ZOO[a].spec == spec.name and a in forced), None)
        if alias is None and taken is not None:
            cases.append(SpecCase(spec.name, None, skip=f"{taken}, the zoo model of spec '{spec.name}', runs under "
                                                          f"--model-spec {ps.options.model_spec} in this run; run "
                                                          f"without --model-spec to check spec '{spec.name}'"))
        elif alias is None:
            cases.append(SpecCase(spec.name, None, skip=f"no zoo model uses spec '{spec.name}'; pass --model with "
                                                          f"a checkpoint of this architecture to check it"))
        else:
            cases.append(SpecCase(spec.name, alias))
    return cases


def _valid_models(metafunc) -> list:
    """The models whose settings are valid; the first invalid one is a collection error."""
    ps = parity_session(metafunc.config)
    valid = []
    reported = metafunc.config.stash[REPORTED_KEY]
    for name in ps.model_names:
        if name in unavailable_models(metafunc.config) or name in unsupported_models(metafunc.config):
            valid.append(name)   # its gates fail or skip at setup (the parity_model fixture)
            continue
        try:
            ps.settings_for(name)
        except FvkitError as err:
            if name not in reported:
                reported.add(name)
                pytest.fail(f"fvkit parity: {err}", pytrace=False)
            continue
        valid.append(name)
    return valid


#: The checks some gate tests exist for only on some models (``@pytest.mark.fvkit_check``).
PARTIAL_CHECKS = ("exact", "fast", "sweep")


def left_out_notes(ps: ParitySession, blocked: dict) -> list:
    """One sentence per check this run leaves out on some models, naming them. Made at
    configure time, so that xdist's controller, which collects nothing, reports it too."""
    left_out = {}
    for name in ps.model_names:
        if name in blocked:
            continue   # its tests fail or skip at setup, saying why
        for check in PARTIAL_CHECKS:
            try:
                why = ps.not_checked(name, check)
            except FvkitError:
                break      # settings the model cannot take: a collection error names them
            if why:
                left_out.setdefault(why, []).append(model_id(name))
    return [f"not checked in this run on {', '.join(models)}: {why}" for why, models in left_out.items()]


def _checked_models(metafunc, names: list) -> list:
    """The models a test marked ``fvkit_check(what)`` exists for (see :func:`left_out_notes`).
    A model that fails or skips at setup keeps its test, which says why."""
    mark = metafunc.definition.get_closest_marker("fvkit_check")
    if mark is None:
        return names
    ps = parity_session(metafunc.config)
    blocked = {**unavailable_models(metafunc.config), **unsupported_models(metafunc.config)}
    return [n for n in names if n in blocked or not ps.not_checked(n, mark.args[0])]


def pytest_generate_tests(metafunc) -> None:
    if "parity_model" in metafunc.fixturenames:
        params = [pytest.param(name, id=param_id(model_id(name)), marks=pytest.mark.fvkit_model(model_id(name)))
                  for name in _checked_models(metafunc, _valid_models(metafunc))]
        metafunc.parametrize("parity_model", params, indirect=True, scope="session")
    if "spec_case" in metafunc.fixturenames:
        # Ids name spec and model ("llama:tiny-llama"): -k selects either, and xdist
        # scheduling keeps the test with its model's other gates.
        params = [pytest.param(case, id=param_id(case.model_key, spec=case.spec),
                               marks=pytest.mark.fvkit_model(case.model_key))
                  for case in spec_cases(parity_session(metafunc.config),
                                         {**unavailable_models(metafunc.config),
                                          **unsupported_models(metafunc.config)})]
        metafunc.parametrize("spec_case", params)


def pytest_collection_modifyitems(config, items) -> None:
    """A test marked ``fvkit_check`` that no model of the run is checked for would be
    pytest's skipped "empty parameter set"; it is deselected instead, as the check is not
    part of the run (the report's notes name it)."""
    unused = [item for item in items if item.get_closest_marker("fvkit_check") is not None
              and not isinstance(getattr(item, "callspec", None) and item.callspec.params.get("parity_model"), str)]
    if unused:
        config.hook.pytest_deselected(items=unused)
        items[:] = [item for item in items if item not in unused]


# --- fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def parity(request) -> ParitySession:
    return parity_session(request.config)


@pytest.fixture(scope="session")
def parity_model(request) -> str:
    """The --model name (alias, hub id or path) a gate test checks."""
    why = unavailable_models(request.config).get(request.param)
    if why:
        pytest.fail(why, pytrace=False)
    why = unsupported_models(request.config).get(request.param)
    if why:
        pytest.skip(why)
    return request.param


@pytest.fixture(scope="session")
def lm(parity, parity_model):
    return parity.model(parity_model)


@pytest.fixture(scope="session")
def model_settings(parity, parity_model):
    return parity.settings_for(parity_model)


@pytest.fixture(scope="session")
def live_reference(parity, parity_model, lm) -> Optional[dict]:
    """The reference's numbers for this model (None without --reference-src), once per model."""
    return parity.live_reference(parity_model)


@pytest.fixture
def recorder(request) -> Recorder:
    return Recorder(request.node)


@pytest.fixture
def gate_context(parity, parity_model, lm, model_settings, live_reference, snapshot, recorder):
    """What a gate needs besides fvkit's numbers; the stage timings are recorded when it ends."""
    meta = (live_reference or {}).get("meta") or {}
    release = parity.reference_release(parity_model)
    recorder.add(settings=model_settings.as_dict(), notes=list(model_settings.notes),
                 reference={"reference_transformers": release,
                            **({"live": reference_environment(meta), "live_timings": meta.get("timings") or {}}
                               if live_reference else {})})
    tok = lm.tokenizer
    bos = {getattr(tok, "bos_token_id", None)}
    if lm.spec.bos_text:
        bos.add(tok.convert_tokens_to_ids(lm.spec.bos_text))
    yield GateContext(model=model_id(parity_model), settings=model_settings, live=live_reference, snapshot=snapshot,
                      update=parity.options.update_snapshots, recorder=recorder,
                      bos_ids=tuple(b for b in bos if isinstance(b, int)), snapshot_hint=SNAPSHOT_HINT,
                      reference_release=release)
    if parity.has_pipeline(parity_model):
        recorder.add(timings=parity.pipeline(parity_model).timings, page=parity.page_entry(parity_model))
    import torch
    from fvkit.models import loader as hf_loader
    # The session's count for this model, and every load this process made so far
    # (a gate or fixture loading behind the session's back shows up as the gap).
    recorder.add(settings={"model_loads_this_process": parity.loads.get(parity_model, 0),
                           "loader_calls_this_process": hf_loader.load_count(),
                           "models_loaded_by_session": len(parity.loads),
                           "torch_threads": torch.get_num_threads()})
