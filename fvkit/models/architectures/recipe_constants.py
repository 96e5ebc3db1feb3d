"""What every tiny zoo recipe shares: the initialisation scheme, vocabularies, token ids.

The gains below are part of every zoo model's fingerprint (its cache key) and
decide its weights, so changing one changes every committed weights hash.

The library's default init (std 0.02) makes a tiny model nearly inert: on a
10-shot antonym prompt tiny-llama's next-token logits have a std of 0.12 (max
prob 5e-5 over 32000 tokens), and removing one attention head's output moves
log p(target) by ~0.01, so indirect effects (~1e-7 in probability) sit close to
float32 noise and parity gates on them prove little. With the gains below the
logits have a std of 3-4 (max prob 1-13%), removing one head moves
log p(target) by ~0.5 (median over heads) against a float32-vs-float64
difference of ~5e-6, and zeroing one layer's attention output changes the
next-token distribution by a total variation of 0.4-1.0.
"""

# --- Initialisation scales ------------------------------------------------------------

#: Std of the (untied) unembedding is UNEMBED_GAIN / sqrt(hidden): the final norm
#: makes its input unit-RMS, so the logits get a std of about UNEMBED_GAIN.
UNEMBED_GAIN = 3.0
#: Token embeddings: std EMBED_GAIN / sqrt(hidden), so the residual stream starts
#: with an RMS comparable to one attention or MLP output (it is not swamped by them
#: and does not swamp them). Tied models use this scale for both roles.
EMBED_GAIN = 4.0
#: Learned position embeddings (GPT-2): smaller than token embeddings, enough for
#: attention to tell positions apart without drowning token identity.
POS_EMBED_STD = 0.2
#: Every other matrix: std PROJ_GAIN / sqrt(fan_in), which keeps activations at
#: unit RMS through each projection.
PROJ_GAIN = 1.0
#: Query/key projections get a larger gain so attention is peaked (scores with a
#: std of about QK_GAIN**2), not a uniform average over the prompt. Fused QKV
#: matrices (GPT-2, GPT-NeoX) get it for their value part too.
QK_GAIN = 1.6
#: Biases: small, non-zero so that bias handling is exercised.
BIAS_STD = 0.05
#: Norm gains: the neutral value (1, or 0 for norms that scale by 1 + weight) plus
#: this much noise, so a mis-wired norm shows up in the outputs.
NORM_NOISE_STD = 0.1

#: Bumped whenever the initialisation scheme changes; part of each cache key.
INIT_SCHEME = "shake256-uniform-v1"

# --- Vocabularies and special tokens ----------------------------------------------------

#: GPT-2 BPE vocabulary (GPT-2, GPT-J, GPT-NeoX, OLMo and Qwen2 tiny models).
GPT2_VOCAB = 50257
#: LLaMA SentencePiece vocabulary (LLaMA, Mistral and Gemma tiny models).
SP_VOCAB = 32000
#: Position limit of every tiny model: far above any prompt the suite builds.
MAX_POSITIONS = 1024
#: '<|endoftext|>' is both BOS and EOS in the GPT-2 vocabulary.
GPT2_IDS = dict(bos_token_id=50256, eos_token_id=50256)
#: '<s>' and '</s>' of the SentencePiece vocabulary; it has no pad token.
SP_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
#: GPT-2-style configs default to dropout 0.1; the zoo models are for inference only.
NO_DROPOUT_GPT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
