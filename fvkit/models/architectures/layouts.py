"""Module layouts that several families share, so each is written once.

transformers' LLaMA-derived decoders (LLaMA, Mistral, Gemma, OLMo, Qwen2 and
checkpoints built on them such as SmolLM2) all name their modules the same way.
"""

#: ModelSpec path fields of a LLaMA-style decoder: ``model.layers.{L}.self_attn.o_proj``.
LLAMA_STYLE_PATHS = dict(
    blocks_path="model.layers", attn_path_in_block="self_attn", out_proj_path_in_attn="o_proj",
    final_norm_path="model.norm", lm_head_path="lm_head",
)
#: Separate query and key projections (every family here but GPT-2's and GPT-NeoX's fused ones).
Q_K_PROJ_SUFFIXES = ("q_proj.weight", "k_proj.weight")
