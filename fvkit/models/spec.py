"""ModelSpec: everything fvkit needs to know about one decoder architecture.

    spec = get_spec("llama")
    blocks = resolve_blocks(model, spec)          # fvkit.models.adapters

A spec is data, not code: dotted module paths, the BOS policy and optional
static dimensions. The pipeline never branches on a model's name; it asks the
spec (through :mod:`fvkit.models.adapters`) where the blocks, attention modules and
out-projections are.

``prepend_bos`` keeps the reference's meaning: True says *the tokenizer adds a
BOS token by itself*, so no BOS text is written into the prompt; False says it
does not, so ``bos_text`` is written at the start of every prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Iterable, Optional

from fvkit.errors import SpecError

#: Path fields that must be non-empty dotted module paths.
PATH_FIELDS = (
    "blocks_path",
    "attn_path_in_block",
    "out_proj_path_in_attn",
    "final_norm_path",
    "lm_head_path",
)

#: Path fields that may list alternatives separated by '|', tried in order. Only
#: modules that fvkit resolves (never hooks by name) may do so: transformers
#: renamed some of them between versions (GPT-NeoX's ``embed_out`` became
#: ``lm_head`` in 5.x), and one spec has to serve both.
ALTERNATIVE_FIELDS = ("final_norm_path", "lm_head_path")


@dataclass(frozen=True)
class ModelSpec:
    """Module layout and BOS policy of one architecture family."""

    name: str
    blocks_path: str
    attn_path_in_block: str
    out_proj_path_in_attn: str
    prepend_bos: bool
    final_norm_path: str = ""
    lm_head_path: str = "lm_head"
    bos_text: str = "<|endoftext|>"
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_size: Optional[int] = None
    architectures: tuple = ()
    model_id_patterns: tuple = ()
    description: str = ""

    def validate(self) -> "ModelSpec":
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError("a ModelSpec has an empty 'name'; give every spec a unique name")
        for fname in PATH_FIELDS:
            value = getattr(self, fname)
            if not isinstance(value, str) or not value.strip():
                raise SpecError(
                    f"ModelSpec '{self.name}': field '{fname}' is missing or empty; "
                    f"set it to the dotted module path (e.g. 'model.layers')"
                )
            alternatives = value.split("|")
            if len(alternatives) > 1 and fname not in ALTERNATIVE_FIELDS:
                raise SpecError(
                    f"ModelSpec '{self.name}': field '{fname}'={value!r} lists alternatives "
                    f"with '|', which only {', '.join(ALTERNATIVE_FIELDS)} may do; give one path"
                )
            for alternative in alternatives:
                if any(not part.strip() for part in alternative.split(".")):
                    raise SpecError(
                        f"ModelSpec '{self.name}': field '{fname}'={value!r} has an empty "
                        f"path component; write it like 'model.layers'"
                    )
        if not isinstance(self.prepend_bos, bool):
            raise SpecError(f"ModelSpec '{self.name}': field 'prepend_bos' must be True or False")
        if not self.prepend_bos and not self.bos_text:
            raise SpecError(
                f"ModelSpec '{self.name}': prepend_bos=False needs a non-empty 'bos_text' "
                f"to write at the start of each prompt"
            )
        for fname in ("n_layers", "n_heads", "head_dim", "hidden_size"):
            value = getattr(self, fname)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise SpecError(f"ModelSpec '{self.name}': field '{fname}' must be a positive int or None")
        return self

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance((v := getattr(self, f.name)), tuple) else v) for f in fields(self)}

    def matches_model_id(self, model_id: str) -> bool:
        return any(re.search(p, model_id, flags=re.IGNORECASE) for p in self.model_id_patterns)


_REGISTRY: dict = {}


def register(spec: ModelSpec, *, replace: bool = False) -> ModelSpec:
    """Validate and register a spec; a malformed spec fails here, naming the field."""
    spec.validate()
    if spec.name in _REGISTRY and not replace:
        raise SpecError(f"a ModelSpec named '{spec.name}' is already registered; pick another name")
    _REGISTRY[spec.name] = spec
    return spec


def all_specs() -> list:
    return list(_REGISTRY.values())


def spec_names() -> list:
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(
            f"unknown model spec '{name}'; registered specs: {', '.join(sorted(_REGISTRY))} "
            f"(see `fvkit specs`)"
        ) from None


def spec_for_model_id(model_id: str) -> Optional[ModelSpec]:
    """The first spec whose model-id patterns match ``model_id`` (most specific first)."""
    for spec in _REGISTRY.values():
        if spec.matches_model_id(model_id):
            return spec
    return None


def spec_for_architectures(architectures: Optional[Iterable[str]]) -> Optional[ModelSpec]:
    for arch in architectures or ():
        for spec in _REGISTRY.values():
            if arch in spec.architectures:
                return spec
    return None


def find_spec(model_id: str = "", architectures: Optional[Iterable[str]] = None) -> ModelSpec:
    """Pick a spec by model id first (a LLaMA-architecture model with its own tokenizer
    policy, such as SmolLM2, is told apart by id), then by ``config.architectures``."""
    spec = spec_for_model_id(model_id) if model_id else None
    spec = spec or spec_for_architectures(architectures)
    if spec is None:
        raise SpecError(
            f"no registered ModelSpec serves model '{model_id}' (architectures "
            f"{list(architectures or [])}); pass --model-spec with one of: "
            f"{', '.join(sorted(_REGISTRY))}, or register a new spec"
        )
    return spec


# --- Registered architectures -------------------------------------------------------
# Order matters for id matching: specific families (smollm2) come before the generic
# architecture they share (llama).

register(ModelSpec(
    name="smollm2",
    blocks_path="model.layers", attn_path_in_block="self_attn", out_proj_path_in_attn="o_proj",
    final_norm_path="model.norm", lm_head_path="lm_head",
    # The converted checkpoint pins add_bos_token=False (transformers 4.49 adds one,
    # 5.x does not); the BOS text is written into the prompt instead.
    prepend_bos=False, bos_text="<|endoftext|>",
    architectures=(), model_id_patterns=(r"smollm2",),
    description="SmolLM2 (LLaMA architecture, GPT-2-style BPE tokenizer without BOS)",
))
register(ModelSpec(
    name="gpt2",
    blocks_path="transformer.h", attn_path_in_block="attn", out_proj_path_in_attn="c_proj",
    final_norm_path="transformer.ln_f", lm_head_path="lm_head",
    prepend_bos=False, bos_text="<|endoftext|>",
    architectures=("GPT2LMHeadModel",),
    model_id_patterns=(r"(^|/)(distil)?gpt2(-medium|-large|-xl)?$", r"tiny-gpt2"),
    description="GPT-2 (all sizes); Conv1D out-projection with bias",
))
register(ModelSpec(
    name="gptj",
    blocks_path="transformer.h", attn_path_in_block="attn", out_proj_path_in_attn="out_proj",
    final_norm_path="transformer.ln_f", lm_head_path="lm_head",
    prepend_bos=False, bos_text="<|endoftext|>",
    architectures=("GPTJForCausalLM",), model_id_patterns=(r"gpt-?j",),
    description="GPT-J; parallel attention/MLP, bias-free out-projection",
))
register(ModelSpec(
    name="gpt_neox",
    blocks_path="gpt_neox.layers", attn_path_in_block="attention", out_proj_path_in_attn="dense",
    # transformers 5 renamed the output embedding from embed_out to lm_head.
    final_norm_path="gpt_neox.final_layer_norm", lm_head_path="embed_out|lm_head",
    prepend_bos=False, bos_text="<|endoftext|>",
    architectures=("GPTNeoXForCausalLM",), model_id_patterns=(r"gpt-?neox", r"pythia"),
    description="GPT-NeoX / Pythia; biased out-projection",
))
register(ModelSpec(
    name="llama",
    blocks_path="model.layers", attn_path_in_block="self_attn", out_proj_path_in_attn="o_proj",
    final_norm_path="model.norm", lm_head_path="lm_head",
    prepend_bos=True,
    architectures=("LlamaForCausalLM",), model_id_patterns=(r"llama",),
    description="LLaMA 1, 2 and 3 (grouped-query attention in 2-70B and 3)",
))
register(ModelSpec(
    name="mistral",
    blocks_path="model.layers", attn_path_in_block="self_attn", out_proj_path_in_attn="o_proj",
    final_norm_path="model.norm", lm_head_path="lm_head",
    prepend_bos=True,
    architectures=("MistralForCausalLM",), model_id_patterns=(r"mistral",),
    description="Mistral (grouped-query attention)",
))
register(ModelSpec(
    name="gemma",
    blocks_path="model.layers", attn_path_in_block="self_attn", out_proj_path_in_attn="o_proj",
    final_norm_path="model.norm", lm_head_path="lm_head",
    prepend_bos=True,
    architectures=("GemmaForCausalLM", "Gemma2ForCausalLM"), model_id_patterns=(r"gemma",),
    description="Gemma 1/2; head_dim is set by the config, not hidden_size // n_heads",
))
register(ModelSpec(
    name="olmo",
    blocks_path="model.layers", attn_path_in_block="self_attn", out_proj_path_in_attn="o_proj",
    final_norm_path="model.norm", lm_head_path="lm_head",
    prepend_bos=False, bos_text="<|endoftext|>",
    architectures=("OlmoForCausalLM", "Olmo2ForCausalLM"), model_id_patterns=(r"olmo",),
    description="OLMo 1/2",
))
register(ModelSpec(
    name="qwen2",
    blocks_path="model.layers", attn_path_in_block="self_attn", out_proj_path_in_attn="o_proj",
    final_norm_path="model.norm", lm_head_path="lm_head",
    prepend_bos=False, bos_text="<|endoftext|>",
    architectures=("Qwen2ForCausalLM",), model_id_patterns=(r"qwen2",),
    description="Qwen2 / Qwen2.5 (grouped-query attention, biased q/k/v)",
))
