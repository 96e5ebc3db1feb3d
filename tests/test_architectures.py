"""Every registered architecture is complete: one family file serves spec, zoo, parity and reference.

Each check runs once per architecture (test id = its spec name), so a new
family file that lacks a piece fails here with the piece named.
"""

import dataclasses
from pathlib import Path

import pytest

from fvkit.errors import FvkitError, SpecError
from fvkit.models import adapters, zoo
from fvkit.models import spec as model_spec
from fvkit.models.architectures import (SUPPORT_MODULES, _check_unique, all_architectures,
                                        default_parity_models, get_architecture, reference_branches,
                                        zoo_recipes)
from fvkit.models.architectures import weights_hash
from fvkit.models.architectures.architecture import Architecture, ReferenceBranch
from fvkit.models.architectures.reference_branches import ALL_BRANCHES, GPT_J
from fvkit.models.spec import find_spec, get_spec

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "fvkit" / "models" / "architectures"
SNAPSHOT_DIR = ROOT / "parity_tests" / "__snapshots__"
#: Snapshot folder -> test name of each parity gate that stores reference numbers per model.
SNAPSHOT_TESTS = {
    "test_m1_prompts": ("test_prompts",),
    "test_m2_mean_activations": ("test_mean_activations",),
    "test_m3_indirect_effect": ("test_indirect_effect", "test_indirect_effect_fast"),
    "test_m4_function_vector": ("test_function_vector", "test_layer_sweep"),
}
#: A real checkpoint's M3 checks fvkit's fast mode only (ParitySession.ie_modes_for).
REAL_MODEL_SKIPS = ("test_indirect_effect",)


#: Marks of the families whose zoo models are real checkpoints from GGUF packages.
REAL_MODEL_MARKS = {"smollm2": [pytest.mark.smollm2], "gemma3": [pytest.mark.gemma3]}


def _params():
    # A family whose zoo models come from a GGUF package needs that package (and is slow
    # the first time), like the other tests of that real model.
    return [pytest.param(a, id=a.name, marks=REAL_MODEL_MARKS.get(a.name, []) if any(e.gguf for e in a.zoo) else [])
            for a in all_architectures()]


@pytest.mark.parametrize("arch", [pytest.param(a, id=a.name) for a in all_architectures()])
def test_architecture_is_complete(arch):
    assert arch.validate(f"{arch.name}.py") is arch
    assert (PACKAGE_DIR / f"{arch.name}.py").is_file()
    # Its spec is the registered one, with its lookup priority.
    assert get_spec(arch.name) is arch.spec
    assert model_spec._PRIORITY[arch.name] == arch.lookup_priority
    # Every zoo model is in the zoo with a committed hash.
    for entry in arch.zoo:
        assert zoo.ZOO[entry.alias] is entry
        assert len(entry.weights_sha256) == 64, f"{entry.alias}: commit its weights_sha256"
        assert zoo.EXPECTED_WEIGHTS_SHA256[entry.alias] == entry.weights_sha256
    # A family built from configs runs in the default parity session with at least one model
    # (Gemma with two: tiny-gemma-hd adds heads whose width differs from the hidden size).
    built = [e for e in arch.zoo if e.source == "random"]
    if built:
        assert len([e for e in built if e.default_parity]) >= 1
    # The reference runner has this layout's branch (or the family says the reference has none).
    if arch.reference_branch is not None:
        assert reference_branches()[arch.spec.layout] == arch.reference_branch.as_entry()


@pytest.mark.parametrize("arch", _params())
def test_recipes_build_and_spec_resolves(arch, zoo_model, real_model_available):
    for entry in arch.zoo:
        if entry.gguf is not None:
            real_model_available(entry.alias)
    for entry in arch.zoo:
        if entry.source == "random":
            # Built afresh, not read back from the cache: the recipe itself gives the hash.
            assert zoo.weights_sha256(zoo.build_random_model(entry.alias)) == entry.weights_sha256
        lm = zoo_model(entry.alias)          # built once into the cache (hash checked), then loaded
        assert lm.weights_sha256 == entry.weights_sha256
        assert lm.spec is arch.spec
        # The spec is also what fvkit picks from the model id and config on its own.
        assert find_spec(entry.alias, lm.model.config.architectures) is arch.spec
        model, spec, dims = lm.model, lm.spec, lm.dims
        assert len(adapters.resolve_blocks(model, spec)) == dims.n_layers
        for layer in range(dims.n_layers):
            out_proj = adapters.resolve_out_proj(model, spec, layer)
            assert adapters.out_proj_in_features(out_proj) == dims.n_heads * dims.head_dim
            if arch.reference_branch is not None and layer == 0:
                assert adapters.is_conv1d(out_proj) == arch.reference_branch.conv1d
        adapters.resolve_final_norm(model, spec)
        assert adapters.resolve_lm_head(model, spec) is model.get_output_embeddings()
        # The query/key suffixes name real weights of this architecture.
        names = [n for n, _ in model.named_parameters()]
        assert all(any(n.endswith(s) for n in names) for s in arch.qk_weight_suffixes)


@pytest.mark.parametrize("arch", [pytest.param(a, id=a.name) for a in all_architectures()])
def test_default_parity_models_have_snapshots(arch):
    for entry in arch.zoo:
        if not entry.default_parity:
            continue
        for folder, tests in SNAPSHOT_TESTS.items():
            for test in tests:
                if entry.trained and test in REAL_MODEL_SKIPS:
                    continue
                found = list((SNAPSHOT_DIR / folder).glob(f"{test}[[]{entry.alias}[]]*.json"))
                assert found, (f"no {folder}/{test}[{entry.alias}]... snapshot; record the reference "
                               f"numbers for it (README, 'Adding an architecture')")


# --- The registry ---------------------------------------------------------------------

def test_every_module_is_a_family_or_support_file():
    modules = {p.stem for p in PACKAGE_DIR.glob("*.py") if p.stem != "__init__"}
    assert modules == set(SUPPORT_MODULES) | {a.name for a in all_architectures()}


def test_zoo_and_defaults_come_from_the_registry():
    assert zoo.ZOO == zoo_recipes()
    assert zoo.DEFAULT_PARITY_MODELS == default_parity_models()
    # Default parity models first, then the others, each in zoo_order.
    assert list(zoo.ZOO)[:len(zoo.DEFAULT_PARITY_MODELS)] == list(zoo.DEFAULT_PARITY_MODELS)


def test_reference_branches_in_the_reference_order():
    assert list(reference_branches().values()) == [b.as_entry() for b in ALL_BRANCHES]
    assert reference_branches()[("model.layers", "self_attn", "o_proj")] == {
        "name": "llama", "conv1d": False, "bias": False}


def test_get_architecture_unknown_names_the_registered():
    with pytest.raises(SpecError, match="no architecture 'bert'.*registered: gemma, gemma3, gpt2"):
        get_architecture("bert")


def _arch(**changes) -> Architecture:
    return dataclasses.replace(get_architecture("llama"), **changes)


@pytest.mark.parametrize("changes,message", [
    (dict(qk_weight_suffixes=()), "needs 'qk_weight_suffixes'"),
    (dict(zoo=()), "has no zoo model"),
    (dict(lookup_priority="high"), "needs an integer 'lookup_priority'"),
    (dict(reference_branch=GPT_J), "picks the reference's 'gpt-j' branch.*model.layers.self_attn.o_proj"),
], ids=["qk-suffixes", "zoo", "priority", "branch-layout"])
def test_incomplete_architecture_is_refused(changes, message):
    with pytest.raises(SpecError, match=f"newfam.py: .*{message}"):
        _arch(**changes).validate("newfam.py")


@pytest.mark.parametrize("changes,message", [
    (dict(spec="gpt2"), "names spec 'gpt2', but this file's architecture is 'llama'"),
    (dict(weights_sha256="abc"), "not 64 lowercase hex digits.*weights_hash tiny-llama"),
    (dict(config={}), "needs a non-empty config"),
    (dict(source="gguf"), "no gguf=GgufSource"),
    (dict(tokenizer="bert-wordpiece"), "tokenizer 'bert-wordpiece'"),
], ids=["spec", "hash", "config", "gguf", "tokenizer"])
def test_incomplete_zoo_entry_is_refused(changes, message):
    entry = dataclasses.replace(zoo.ZOO["tiny-llama"], **changes)
    with pytest.raises(SpecError, match=message):
        _arch(zoo=(entry,)).validate("newfam.py")


@pytest.mark.parametrize("field,value", [("lookup_priority", 60), ("zoo_order", 20)])
def test_shared_priority_or_position_is_refused(field, value):
    twin = dataclasses.replace(get_architecture("mistral"), **{field: value})
    with pytest.raises(SpecError, match=f"mistral.py and .*llama.py both use {field} {value}"):
        _check_unique([get_architecture("llama"), twin])


def test_shared_alias_is_refused():
    twin = dataclasses.replace(get_architecture("mistral"), zoo=get_architecture("llama").zoo)
    with pytest.raises(SpecError, match="zoo alias 'tiny-llama'"):
        _check_unique([get_architecture("llama"), twin])


def test_branch_entry_is_the_runner_record():
    branch = ReferenceBranch("x", ("a.b", "c", "d"), conv1d=True, bias=False)
    assert branch.as_entry() == {"name": "x", "conv1d": True, "bias": False}


# --- Lookup priority ------------------------------------------------------------------

@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(model_spec, "_REGISTRY", dict(model_spec._REGISTRY))
    monkeypatch.setattr(model_spec, "_PRIORITY", dict(model_spec._PRIORITY))


def test_priority_not_position_decides_ties(registry):
    llama = get_spec("llama")
    # Registered last, but with a higher priority than llama: it wins llama's ids.
    model_spec.register(dataclasses.replace(llama, name="llama-fork"), priority=1000)
    assert find_spec("meta-llama/Llama-2-7b-hf").name == "llama-fork"
    assert model_spec.spec_names()[0] == "llama-fork"
    # Without a priority a new spec goes below every built-in one.
    model_spec.register(dataclasses.replace(llama, name="late", model_id_patterns=(r"smollm2",)))
    assert find_spec("HuggingFaceTB/SmolLM2-135M").name == "smollm2"
    assert model_spec.spec_names()[-1] == "late"


def test_smollm2_outranks_llama():
    assert get_architecture("smollm2").lookup_priority > get_architecture("llama").lookup_priority
    assert find_spec("HuggingFaceTB/SmolLM2-135M-Instruct", ["LlamaForCausalLM"]).name == "smollm2"


# --- The hash tool --------------------------------------------------------------------

def test_weights_hash_prints_the_committed_hash(capsys):
    assert weights_hash.main(["tiny-gpt2"]) == 0
    assert capsys.readouterr().out == f"{zoo.EXPECTED_WEIGHTS_SHA256['tiny-gpt2']}  tiny-gpt2\n"


def test_weights_hash_unknown_alias(capsys):
    assert weights_hash.main(["tiny-bert"]) == 2
    assert "'tiny-bert' is not a zoo model" in capsys.readouterr().err


def test_build_without_a_committed_hash_says_what_to_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("FVKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.EXPECTED_WEIGHTS_SHA256, "tiny-gpt2", "")
    expected = get_architecture("gpt2").zoo[0].weights_sha256
    with pytest.raises(FvkitError, match=f'no committed weights hash.*weights_sha256="{expected}" in '
                                         f'fvkit/models/architectures/gpt2.py'):
        zoo.ensure_built("tiny-gpt2")
