"""GPT-NeoX / Pythia: fused QKV, parallel residual, partial rotary, biased out-projection."""

from fvkit.models.architectures.architecture import Architecture, ModelSpec, ZooEntry
from fvkit.models.architectures.recipe_constants import GPT2_IDS, GPT2_VOCAB, MAX_POSITIONS
from fvkit.models.architectures.reference_branches import GPT_NEOX
from fvkit.models.tokenizers import GPT2_BPE

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="gpt_neox",
        blocks_path="gpt_neox.layers", attn_path_in_block="attention", out_proj_path_in_attn="dense",
        # transformers 5 renamed the output embedding from embed_out to lm_head.
        final_norm_path="gpt_neox.final_layer_norm", lm_head_path="embed_out|lm_head",
        prepend_bos=False, bos_text="<|endoftext|>",
        architectures=("GPTNeoXForCausalLM",), model_id_patterns=(r"gpt-?neox", r"pythia"),
        description="GPT-NeoX / Pythia; biased out-projection",
    ),
    lookup_priority=70,
    zoo_order=40,
    qk_weight_suffixes=("query_key_value.weight",),
    zoo=(
        ZooEntry("tiny-neox", "gpt_neox", "gpt_neox", dict(
            num_hidden_layers=3, num_attention_heads=3, hidden_size=36, intermediate_size=37,
            rotary_pct=0.5, rotary_emb_base=10000, max_position_embeddings=MAX_POSITIONS,
            vocab_size=GPT2_VOCAB, hidden_act="gelu", layer_norm_eps=1e-5,
            use_parallel_residual=True, attention_bias=True, hidden_dropout=0.0,
            attention_dropout=0.0, tie_word_embeddings=False, **GPT2_IDS),
            GPT2_BPE, "GPT-NeoX: fused QKV, parallel residual, partial rotary",
            weights_sha256="68b82ccf4246d5de27c54ce09522a09969b2d28f02b09400a460837748970c19",
            default_parity=True),
    ),
    reference_branch=GPT_NEOX,
)
