"""OLMo 1/2: non-parametric layer norms, LLaMA module layout."""

from fvkit.models.architectures.architecture import Architecture, ModelSpec, ZooEntry
from fvkit.models.architectures.layouts import LLAMA_STYLE_PATHS, Q_K_PROJ_SUFFIXES
from fvkit.models.architectures.recipe_constants import GPT2_IDS, GPT2_VOCAB, MAX_POSITIONS
from fvkit.models.architectures.reference_branches import LLAMA
from fvkit.models.tokenizers import GPT2_BPE

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="olmo",
        **LLAMA_STYLE_PATHS,
        prepend_bos=False, bos_text="<|endoftext|>",
        architectures=("OlmoForCausalLM", "Olmo2ForCausalLM"), model_id_patterns=(r"olmo",),
        description="OLMo 1/2",
    ),
    lookup_priority=30,
    zoo_order=60,
    qk_weight_suffixes=Q_K_PROJ_SUFFIXES,
    zoo=(
        ZooEntry("tiny-olmo", "olmo", "olmo", dict(
            num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=5, hidden_size=40,
            intermediate_size=37, vocab_size=GPT2_VOCAB, max_position_embeddings=MAX_POSITIONS,
            hidden_act="silu", rope_theta=10000.0, attention_bias=False, clip_qkv=None,
            tie_word_embeddings=False, pad_token_id=50256, **GPT2_IDS),
            GPT2_BPE, "OLMo: non-parametric layer norms",
            weights_sha256="f41047d5882675da521fd039e148f266e89e7813dadbce8be31806c454f44624",
            default_parity=True),
    ),
    reference_branch=LLAMA,
)
