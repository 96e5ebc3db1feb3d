"""LLaMA 1, 2 and 3: RMSNorm, rotary positions, grouped-query attention."""

from fvkit.models.architectures.architecture import Architecture, ModelSpec, ZooEntry
from fvkit.models.architectures.layouts import LLAMA_STYLE_PATHS, Q_K_PROJ_SUFFIXES
from fvkit.models.architectures.recipe_constants import MAX_POSITIONS, SP_IDS, SP_VOCAB
from fvkit.models.architectures.reference_branches import LLAMA
from fvkit.models.tokenizers import LLAMA_SP

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="llama",
        **LLAMA_STYLE_PATHS,
        prepend_bos=True,
        architectures=("LlamaForCausalLM",), model_id_patterns=(r"llama",),
        description="LLaMA 1, 2 and 3 (grouped-query attention in 2-70B and 3)",
    ),
    # Below the checkpoint families built on it (smollm2) and the anchored GPT ids.
    lookup_priority=60,
    zoo_order=20,
    qk_weight_suffixes=Q_K_PROJ_SUFFIXES,
    zoo=(
        ZooEntry("tiny-llama", "llama", "llama", dict(
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=40,
            intermediate_size=53, vocab_size=SP_VOCAB, max_position_embeddings=MAX_POSITIONS,
            hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False,
            mlp_bias=False, tie_word_embeddings=False, **SP_IDS),
            LLAMA_SP, "LLaMA with grouped-query attention (4 heads, 2 KV heads)",
            weights_sha256="699778ce2c07580b6bb662ecb232e7369c29fdcda660498ee8ac036f7f515ee3",
            default_parity=True),
    ),
    reference_branch=LLAMA,
)
