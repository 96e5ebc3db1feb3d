"""Mistral: grouped-query attention, LLaMA module layout."""

from fvkit.models.architectures.architecture import Architecture, ModelSpec, ZooEntry
from fvkit.models.architectures.layouts import LLAMA_STYLE_PATHS, Q_K_PROJ_SUFFIXES
from fvkit.models.architectures.recipe_constants import MAX_POSITIONS, SP_IDS, SP_VOCAB
from fvkit.models.architectures.reference_branches import LLAMA
from fvkit.models.tokenizers import LLAMA_SP

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="mistral",
        **LLAMA_STYLE_PATHS,
        prepend_bos=True,
        architectures=("MistralForCausalLM",), model_id_patterns=(r"mistral",),
        description="Mistral (grouped-query attention)",
    ),
    lookup_priority=50,
    zoo_order=70,
    qk_weight_suffixes=Q_K_PROJ_SUFFIXES,
    zoo=(
        ZooEntry("tiny-mistral", "mistral", "mistral", dict(
            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
            hidden_size=48, intermediate_size=61, vocab_size=SP_VOCAB,
            max_position_embeddings=MAX_POSITIONS, hidden_act="silu", rms_norm_eps=1e-5,
            rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False, **SP_IDS),
            LLAMA_SP, "Mistral with grouped-query attention (6 heads, 2 KV heads)",
            weights_sha256="a1b1429a01d169a38b058a9211c2fc55617abd75ca2839c4a9abb3785f746d06",
            default_parity=True),
    ),
    reference_branch=LLAMA,
)
