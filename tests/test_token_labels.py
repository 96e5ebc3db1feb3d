"""Token meta-labels, the single-token slot layout and the index maps."""

import os
from pathlib import Path

import pytest

from fvkit.method.prompts import DEFAULT_TEMPLATE, Template, build_prompt_data
from fvkit.method.token_labels import dummy_token_labels, full_index_map, slot_index_map, token_meta_labels

BOS = "<|endoftext|>"
#: Output separator "\n" followed by an input prefix "\n": the two merge into one
#: GPT-2 token, so the prefix adds no token and overwrites the separator's label.
MERGING = Template(prefixes={"input": "\n", "output": "A:", "instructions": ""},
                   separators={"input": "\n", "output": "\n", "instructions": ""})


def labels_of(tok, demos, query, template=DEFAULT_TEMPLATE, prepend_bos=False):
    data = build_prompt_data(demos, query, template, None if prepend_bos else BOS)
    return token_meta_labels(data, tok, prepend_bos)


def test_single_token_words(gpt2_tokenizer):
    labels, text = labels_of(gpt2_tokenizer, [("hot", "cold")], ("up", "down"))
    assert text == f"{BOS}Q: hot\nA: cold\n\nQ: up\nA:"
    assert [lab for _, _, lab in labels] == [
        "bos_token", "structural_token", "structural_token", "demonstration_1_token", "separator_token",
        "structural_token", "predictive_token", "demonstration_1_label_token", "end_of_example_token",
        "query_structural_token", "query_structural_token", "query_structural_token", "query_demonstration_token",
        "query_separator_token", "query_structural_token", "query_predictive_token",
    ]
    assert labels[-1][2] == "query_predictive_token"
    assert len(labels) == len(gpt2_tokenizer(text).input_ids)


def test_word_split_into_several_tokens(gpt2_tokenizer):
    labels, _ = labels_of(gpt2_tokenizer, [("hot", "cold"), ("antidisestablishment", "establishment")], ("up", "down"))
    word = [(i, tok) for i, tok, lab in labels if lab == "demonstration_2_token"]
    assert "".join(tok for _, tok in word) == " antidisestablishment" and len(word) == 3
    dummy = dummy_token_labels(2, gpt2_tokenizer, False, BOS)
    idx_map, idx_avg = slot_index_map(labels, dummy)
    first, last = word[0][0], word[-1][0]
    assert idx_avg == {"demonstration_2_token": (first, last)}
    assert len(idx_map) == len(dummy)                 # every slot filled once
    assert first in idx_map and last not in idx_map   # later tokens of the word share its slot
    full = full_index_map(idx_map, idx_avg)
    assert full[last] == full[first] == idx_map[first]
    assert [lab for _, lab in dummy][idx_map[first]] == "demonstration_2_token"
    # Slots after the long word are shifted back by the tokens it added.
    assert idx_map[labels[-1][0]] == len(dummy) - 1


def test_separator_merging_with_its_neighbour(gpt2_tokenizer):
    labels, text = labels_of(gpt2_tokenizer, [("hot", "cold"), ("up", "down")], ("in", "out"), MERGING)
    merged = [(tok, lab) for _, tok, lab in labels if tok == "\n\n"]
    # The separator's end-of-example label was overwritten by the next part's label.
    assert merged == [("\n\n", "structural_token"), ("\n\n", "query_structural_token")]
    assert "end_of_example_token" not in [lab for _, _, lab in labels]
    dummy = dummy_token_labels(2, gpt2_tokenizer, False, BOS, MERGING)
    idx_map, idx_avg = slot_index_map(labels, dummy)
    assert idx_avg == {} and idx_map == {i: i for i in range(len(dummy))}


def test_tokenizer_that_adds_bos(sp_tokenizer):
    labels, text = labels_of(sp_tokenizer, [("hot", "cold")], ("up", "down"), prepend_bos=True)
    assert not text.startswith(BOS)
    assert labels[0][1:] == ("<s>", "bos_token")
    assert labels[-1][2] == "query_predictive_token"
    # SentencePiece splits "\n\n" in two; only the first becomes end_of_example.
    tail = [lab for _, tok, lab in labels if tok == "\n"][1:3]
    assert tail == ["end_of_example_token", "separator_token"]


def test_labels_are_cut_to_the_token_count(gpt2_tokenizer):
    """A BOS label seeded for a tokenizer that does not add BOS: one label too many,
    and the pairing stops at the shorter list, as in the reference."""
    data = build_prompt_data([("hot", "cold")], ("up", "down"), DEFAULT_TEMPLATE, BOS)
    labels, text = token_meta_labels(data, gpt2_tokenizer, prepend_bos=True)
    assert len(labels) == len(gpt2_tokenizer(text).input_ids)
    assert labels[-1][2] != "query_predictive_token"   # shifted by the extra label


def _reference_prompt_utils():
    src = os.environ.get("FVKIT_REFERENCE_SRC", "/tmp/ref/function_vectors")
    path = Path(src) / "src" / "utils" / "prompt_utils.py"
    if not path.is_file():
        pytest.skip(f"no reference checkout at {src} (set FVKIT_REFERENCE_SRC)")
    pytest.importorskip("pandas")
    pytest.importorskip("sklearn")
    import importlib.util
    spec = importlib.util.spec_from_file_location("fv_reference_prompt_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("template", [DEFAULT_TEMPLATE, MERGING], ids=["default", "merging"])
@pytest.mark.parametrize("tok_name,prepend_bos", [("gpt2_tokenizer", False), ("sp_tokenizer", True)])
def test_same_labels_and_maps_as_the_reference(request, template, tok_name, prepend_bos):
    ref = _reference_prompt_utils()
    tok = request.getfixturevalue(tok_name)
    pairs = {"input": ["hot", "antidisestablishment", "up"], "output": ["cold", "establishment", "down"]}
    ref_data = ref.word_pairs_to_prompt_data(pairs, query_target_pair={"input": ["big"], "output": ["small"]},
                                             prepend_bos_token=not prepend_bos, prefixes=template.prefixes,
                                             separators=template.separators)
    ref_labels, ref_text = ref.get_token_meta_labels(ref_data, tok, prepend_bos=prepend_bos)
    labels, text = labels_of(tok, list(zip(pairs["input"], pairs["output"])), ("big", "small"), template, prepend_bos)
    assert text == ref_text
    assert [(int(i), t, l) for i, t, l in ref_labels] == labels
    model_config = {"prepend_bos": prepend_bos}
    ref_dummy = ref.get_dummy_token_labels(3, tok, model_config, prefixes=template.prefixes, separators=template.separators)
    dummy = dummy_token_labels(3, tok, prepend_bos, BOS, template)
    assert [(int(i), l) for i, l in ref_dummy] == dummy
    ref_map, ref_avg = ref.compute_duplicated_labels(ref_labels, ref_dummy)
    idx_map, idx_avg = slot_index_map(labels, dummy)
    assert {int(k): int(v) for k, v in ref_map.items()} == idx_map
    assert {k: (int(a), int(b)) for k, (a, b) in ref_avg.items()} == idx_avg
    ref_full = ref.update_idx_map(ref_map, ref_avg)
    assert {int(k): int(v) for k, v in ref_full.items()} == full_index_map(idx_map, idx_avg)
