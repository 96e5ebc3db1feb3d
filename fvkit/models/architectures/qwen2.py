"""Qwen2 / Qwen2.5: biased q/k/v, grouped-query attention, LLaMA module layout."""

from fvkit.models.architectures.architecture import Architecture, ModelSpec, ZooEntry
from fvkit.models.architectures.layouts import LLAMA_STYLE_PATHS, Q_K_PROJ_SUFFIXES
from fvkit.models.architectures.recipe_constants import GPT2_IDS, GPT2_VOCAB, MAX_POSITIONS
from fvkit.models.architectures.reference_branches import LLAMA
from fvkit.models.tokenizers import QWEN2_BPE

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="qwen2",
        **LLAMA_STYLE_PATHS,
        prepend_bos=False, bos_text="<|endoftext|>",
        architectures=("Qwen2ForCausalLM",), model_id_patterns=(r"qwen2",),
        description="Qwen2 / Qwen2.5 (grouped-query attention, biased q/k/v)",
    ),
    lookup_priority=20,
    zoo_order=80,
    qk_weight_suffixes=Q_K_PROJ_SUFFIXES,
    zoo=(
        ZooEntry("tiny-qwen2", "qwen2", "qwen2", dict(
            num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, hidden_size=36,
            intermediate_size=47, vocab_size=GPT2_VOCAB, max_position_embeddings=MAX_POSITIONS,
            hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, use_sliding_window=False,
            sliding_window=None, max_window_layers=3, tie_word_embeddings=False,
            pad_token_id=50256, **GPT2_IDS),
            QWEN2_BPE, "Qwen2: biased q/k/v, grouped-query attention (6 heads, 2 KV heads)",
            weights_sha256="3852fb0f630a94c28f019f3baff266ad85e1db2df02fd05d914a01b6aff50a35",
            default_parity=True),
    ),
    reference_branch=LLAMA,
)
