"""GPT-2 (all sizes): Conv1D projections with bias, learned positions, tied embeddings."""

from fvkit.models.architectures.architecture import Architecture, ModelSpec, ZooEntry
from fvkit.models.architectures.recipe_constants import GPT2_IDS, GPT2_VOCAB, MAX_POSITIONS, NO_DROPOUT_GPT
from fvkit.models.architectures.reference_branches import GPT2_XL
from fvkit.models.tokenizers import GPT2_BPE

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="gpt2",
        blocks_path="transformer.h", attn_path_in_block="attn", out_proj_path_in_attn="c_proj",
        final_norm_path="transformer.ln_f", lm_head_path="lm_head",
        prepend_bos=False, bos_text="<|endoftext|>",
        architectures=("GPT2LMHeadModel",),
        model_id_patterns=(r"(^|/)(distil)?gpt2(-medium|-large|-xl)?$", r"tiny-gpt2"),
        description="GPT-2 (all sizes); Conv1D out-projection with bias",
    ),
    # Its id patterns are anchored, so it may go before the broader ones below it.
    lookup_priority=90,
    zoo_order=10,
    qk_weight_suffixes=("c_attn.weight",),
    zoo=(
        ZooEntry("tiny-gpt2", "gpt2", "gpt2", dict(
            n_layer=3, n_head=3, n_embd=36, n_inner=53, n_positions=MAX_POSITIONS,
            vocab_size=GPT2_VOCAB, activation_function="gelu_new", layer_norm_epsilon=1e-5,
            tie_word_embeddings=True, **NO_DROPOUT_GPT, **GPT2_IDS),
            GPT2_BPE, "GPT-2: Conv1D projections, learned positions, tied embeddings",
            weights_sha256="7725aaea028ae1c118fb12303043d1b85cfa141834e90c13772fba5fc581e4cd",
            default_parity=True),
    ),
    reference_branch=GPT2_XL,
)
