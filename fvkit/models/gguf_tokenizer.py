"""A SentencePiece-style BPE tokenizer rebuilt from a GGUF file's vocabulary, the same under every release.

    tok = tokenizer_from_gguf_vocabulary("/path/gemma-3-270m-q4_k_m.gguf")
    tok("walk→walked")["input_ids"]            # [2, 20723, 238183, 20723, 524]

A GGUF file of a SentencePiece BPE model (``tokenizer.ggml.model = 'llama'``)
stores its tokens, token types and scores, but no merges. transformers rebuilds
a tokenizer from them, and the result depends on the release: for Gemma 3's
file, 4.53 builds a Unigram model from scores that do not follow Gemma's merge
order (so " jump" becomes two tokens and the model sees text it was never
trained on), while 5.x derives merges from the vocabulary. fvkit builds the
tokenizer itself, so every release gets the same token ids:

* every token that can be cut into two tokens of the vocabulary gives one
  merge per cut; merges are ranked by the merged token's position in the file
  (Gemma's vocabulary lists tokens in merge order; its scores do not), then by
  a longer left part first;
* a token written with real spaces (Gemma stores runs of blanks that way) is
  looked up as '▁' characters, as the normaliser writes spaces;
* control tokens become special tokens and user-defined ones added tokens, so
  neither is cut apart; byte tokens (``<0x41>``) serve the byte fallback.

The pipeline (spaces to '▁', split after each space, ``bos`` in front,
'▁' back to spaces on decoding) is a SentencePiece model's without a prefix
space, what the file's ``add_space_prefix = False`` asks for.
"""

from __future__ import annotations

from fvkit.errors import FvkitError

#: GGUF token types (gguf.TokenType): what each kind of token becomes.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 3, 4, 6
#: What SentencePiece writes for a space.
SPACE = "\u2581"


def _field(reader, key: str, what: str):
    field = reader.fields.get(key)
    if field is None:
        raise FvkitError(f"the GGUF file has no '{key}' ({what}); it cannot be read as a SentencePiece BPE model")
    return field


def read_vocabulary(path: str) -> dict:
    """``{"tokens", "types", "bos", "eos", "pad", "unk", "model", "add_space_prefix"}`` of the file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tokens_field = _field(reader, "tokenizer.ggml.tokens", "the vocabulary")
    types_field = _field(reader, "tokenizer.ggml.token_type", "the token types")
    tokens = [bytes(tokens_field.parts[i]).decode("utf-8") for i in tokens_field.data]
    types = [int(types_field.parts[i][0]) for i in types_field.data]

    def scalar(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.parts[-1][0].item()

    model = bytes(_field(reader, "tokenizer.ggml.model", "the tokenizer kind").parts[-1]).decode()
    return {"tokens": tokens, "types": types, "model": model,
            "bos": scalar("tokenizer.ggml.bos_token_id"), "eos": scalar("tokenizer.ggml.eos_token_id"),
            "pad": scalar("tokenizer.ggml.padding_token_id"), "unk": scalar("tokenizer.ggml.unknown_token_id"),
            "add_space_prefix": bool(scalar("tokenizer.ggml.add_space_prefix", True))}


def respell(token: str) -> str:
    """A token of blanks only, stored with real spaces, as the normaliser spells it ('▁')."""
    return SPACE * len(token) if " " in token and not token.strip() else token


def merges_in_vocabulary_order(tokens: list) -> list:
    """``[(left, right)]``: every cut of a token into two tokens, by the token's position, then
    longer left part first (see module docstring)."""
    index = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for position, token in enumerate(tokens):
        for cut in range(len(token) - 1, 0, -1):    # longer left part first
            left, right = token[:cut], token[cut:]
            if left in index and right in index:
                ranked.append((position, left, right))
    return [(left, right) for _, left, right in ranked]


def tokenizer_from_gguf_vocabulary(path: str, *, add_bos_token: bool = True):
    """A ``PreTrainedTokenizerFast`` for the SentencePiece BPE model in the GGUF file at ``path``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = read_vocabulary(path)
    if vocab["model"] != "llama" or vocab["add_space_prefix"]:
        raise FvkitError(f"{path}: tokenizer kind '{vocab['model']}' (add_space_prefix="
                         f"{vocab['add_space_prefix']}) is not a SentencePiece BPE model without a prefix "
                         f"space; load its tokenizer with transformers' own converter instead")
    tokens = [respell(t) for t in vocab["tokens"]]
    if len(set(tokens)) != len(tokens):
        raise FvkitError(f"{path}: the vocabulary lists a token twice; its token ids would be ambiguous")
    names = {key: tokens[vocab[key]] for key in ("bos", "eos", "pad", "unk") if vocab[key] is not None}
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges_in_vocabulary_order(tokens),
                       unk_token=names.get("unk"), fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    if add_bos_token:
        bos = names["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab["bos"])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, vocab["types"]) if kind == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, vocab["types"]) if kind == TOKEN_USER_DEFINED])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **{f"{k}_token": v for k, v in names.items()})
