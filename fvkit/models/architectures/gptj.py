"""GPT-J: parallel attention and MLP, partial rotary positions, bias-free out-projection."""

from fvkit.models.architectures.architecture import Architecture, ModelSpec, ZooEntry
from fvkit.models.architectures.layouts import Q_K_PROJ_SUFFIXES
from fvkit.models.architectures.recipe_constants import GPT2_IDS, GPT2_VOCAB, MAX_POSITIONS, NO_DROPOUT_GPT
from fvkit.models.architectures.reference_branches import GPT_J
from fvkit.models.tokenizers import GPT2_BPE

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="gptj",
        blocks_path="transformer.h", attn_path_in_block="attn", out_proj_path_in_attn="out_proj",
        final_norm_path="transformer.ln_f", lm_head_path="lm_head",
        prepend_bos=False, bos_text="<|endoftext|>",
        architectures=("GPTJForCausalLM",), model_id_patterns=(r"gpt-?j",),
        description="GPT-J; parallel attention/MLP, bias-free out-projection",
    ),
    lookup_priority=80,
    zoo_order=30,
    qk_weight_suffixes=Q_K_PROJ_SUFFIXES,
    zoo=(
        ZooEntry("tiny-gptj", "gptj", "gptj", dict(
            n_layer=2, n_head=4, n_embd=48, n_inner=67, rotary_dim=8, n_positions=MAX_POSITIONS,
            vocab_size=GPT2_VOCAB, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            tie_word_embeddings=False, **NO_DROPOUT_GPT, **GPT2_IDS),
            GPT2_BPE, "GPT-J: parallel attention/MLP, partial rotary (8 of 12 dims)",
            weights_sha256="2aa70038c267cc60c8223bf630afa64d1d730344549c4c982e96a95a88cf3f49",
            default_parity=True),
    ),
    reference_branch=GPT_J,
)
