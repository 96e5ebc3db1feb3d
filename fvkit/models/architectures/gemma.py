"""Gemma 1/2: explicit head_dim, embeddings scaled by sqrt(hidden), (1 + weight) norms.

Two zoo models, both in the default parity session: ``tiny-gemma`` (4 x 12 =
hidden 48), and ``tiny-gemma-hd`` with ``n_heads * head_dim != hidden_size`` (3 x
16 = 48 against 40) and multi-query attention, for code that assumes otherwise.
"""

import math

from fvkit.models.architectures.architecture import Architecture, ModelSpec, ZooEntry
from fvkit.models.architectures.layouts import LLAMA_STYLE_PATHS, Q_K_PROJ_SUFFIXES
from fvkit.models.architectures.recipe_constants import MAX_POSITIONS, SP_IDS, SP_VOCAB
from fvkit.models.architectures.reference_branches import LLAMA
from fvkit.models.tokenizers import LLAMA_SP

#: What both Gemma recipes share besides their sizes.
_GEMMA_CONFIG = dict(
    vocab_size=SP_VOCAB, max_position_embeddings=MAX_POSITIONS, hidden_act="gelu_pytorch_tanh",
    hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
    attention_bias=False, tie_word_embeddings=False, **SP_IDS)

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="gemma",
        **LLAMA_STYLE_PATHS,
        prepend_bos=True,
        architectures=("GemmaForCausalLM", "Gemma2ForCausalLM"), model_id_patterns=(r"gemma",),
        description="Gemma 1/2; head_dim is set by the config, not hidden_size // n_heads",
    ),
    lookup_priority=40,
    zoo_order=50,
    qk_weight_suffixes=Q_K_PROJ_SUFFIXES,
    zoo=(
        ZooEntry("tiny-gemma", "gemma", "gemma", dict(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            hidden_size=48, intermediate_size=53, **_GEMMA_CONFIG),
            LLAMA_SP, "Gemma: explicit head_dim (4 x 12 = hidden 48), scaled embeddings",
            embed_scale=math.sqrt(48),
            weights_sha256="b67725461ba61209ebd13d0c3674607decc524812ff004309f8c699c9e2092bb",
            default_parity=True),
        ZooEntry("tiny-gemma-hd", "gemma", "gemma", dict(
            num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
            hidden_size=40, intermediate_size=37, **_GEMMA_CONFIG),
            LLAMA_SP, "Gemma with head_dim x heads (3 x 16 = 48) != hidden 40, multi-query",
            embed_scale=math.sqrt(40),
            weights_sha256="126d099ed63fce5fc9a1126c7e7c8745f387f7516108c8f43b653f6b5af46a0d",
            # The reference runs on it too (its head split at n_heads*head_dim, fvkit's
            # vector injected into its evaluations), so its gates compare every stage
            # the reference can compute.
            default_parity=True),
    ),
    reference_branch=LLAMA,
)
