"""Property tests of the text side: token labels, fixed-trials files, the dataset loader.

Examples (tests/test_token_labels.py, test_fixed_trials.py, test_data.py) pin the
reference's exact layouts; these search random word lists, templates and JSON
for the rules that must hold everywhere. Profiles: FVKIT_HYPOTHESIS_PROFILE=ci
(default, quick) or long (see tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import re

import pytest

pytest.importorskip("hypothesis", reason="hypothesis (the `test` extra) is not installed")

from hypothesis import given, strategies as st  # noqa: E402

from fvkit.errors import FvkitError  # noqa: E402
from fvkit.method.data import load_task_dataset  # noqa: E402
from fvkit.method.fixed_trials import STAGES, FixedTrials  # noqa: E402
from fvkit.method.prompts import Template, build_prompt_data  # noqa: E402
from fvkit.method.token_labels import dummy_token_labels, slot_index_map, token_meta_labels  # noqa: E402

GPT2_BOS = "<|endoftext|>"

#: Lower-case words as task rows hold them; the leading space is the prompt's own.
words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=10)
pairs = st.tuples(words, words)
#: Templates in the family the reference's tasks use: a word prefix ending in ':' and
#: newline separators, so that no part can merge into a neighbouring word.
templates = st.builds(
    lambda qi, qo, sep_in, sep_out: Template(prefixes={"input": qi, "output": qo, "instructions": ""},
                                             separators={"input": sep_in, "output": sep_out, "instructions": ""}),
    st.sampled_from(["Q:", "Input:", "x:", "Question:"]), st.sampled_from(["A:", "Output:", "y:", "Answer:"]),
    st.sampled_from(["\n"]), st.sampled_from(["\n", "\n\n"]))


@pytest.mark.parametrize("tokenizer_name", ["gpt2_tokenizer", "sp_tokenizer"])
@given(demos=st.lists(pairs, min_size=1, max_size=6), query=pairs, template=templates)
def test_token_labels_cover_the_prompt(request, tokenizer_name, demos, query, template):
    tok = request.getfixturevalue(tokenizer_name)
    prepend_bos = tokenizer_name == "sp_tokenizer"
    data = build_prompt_data(demos, query, template, None if prepend_bos else GPT2_BOS)
    labels, text = token_meta_labels(data, tok, prepend_bos)
    # One label per token of the prompt, in order.
    assert len(labels) == len(tok(text).input_ids)
    assert [i for i, _, _ in labels] == list(range(len(labels)))
    names = [lab for _, _, lab in labels]
    # Every demonstration's input and label slot is present, and the query's input.
    for k in range(1, len(demos) + 1):
        assert f"demonstration_{k}_token" in names and f"demonstration_{k}_label_token" in names, k
    assert "query_demonstration_token" in names
    # The query's last token (its "A:") is the prompt's last token.
    assert names[-1] == "query_predictive_token" and names.count("query_predictive_token") == 1
    assert names[0] == "bos_token"
    # The slot map sends every kept token to a slot of the single-token layout.
    dummy = dummy_token_labels(len(demos), tok, prepend_bos, GPT2_BOS, template)
    idx_map, idx_avg = slot_index_map(labels, dummy)
    assert set(idx_map.values()) <= {slot for slot, _ in dummy}
    assert all(lo < hi for lo, hi in idx_avg.values())


def dataset_file(tmp_path_factory, rows) -> str:
    path = tmp_path_factory.mktemp("ds") / "task.json"
    path.write_text(json.dumps(rows))
    return str(path)


@given(rows=st.lists(st.fixed_dictionaries({"input": words, "output": words}), min_size=8, max_size=40,
                    unique_by=lambda row: (row["input"], row["output"])),
       n_trials=st.integers(1, 5), seed=st.integers(0, 2**31 - 1),
       test_size=st.sampled_from([0.2, 0.3, 0.5]), data=st.data())
def test_fixed_trials_file_round_trip(tmp_path_factory, rows, n_trials, seed, test_size, data):
    ds = load_task_dataset(dataset_file(tmp_path_factory, rows))
    n_train = len(rows) - math.ceil(len(rows) * test_size)   # the split ceils the test share
    n_shots = data.draw(st.integers(1, max(1, min(5, int(n_train)))), label="n_shots")
    try:
        trials = FixedTrials.make(ds, n_trials, n_shots, seed, test_size)
    except FvkitError as err:      # a split too small for the shots: said in words
        assert "split" in str(err) or "n_shots" in str(err)
        return
    path = trials.save(tmp_path_factory.mktemp("trials") / f"{trials.id}.json")
    again = FixedTrials.load(path, ds)
    assert again.as_dict() == trials.as_dict()
    for stage in STAGES:
        for i in range(again.n_items(stage)):
            assert again.pairs(stage, i, ds) == trials.pairs(stage, i, ds)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["input", "output", "x"]), inner,
                                                                max_size=3),
    max_leaves=12)


# A valid dataset may come with a warning (duplicate rows); only an error or a traceback matters here.
@pytest.mark.filterwarnings("ignore::fvkit.errors.DataWarning")
@given(value=json_values | st.lists(st.fixed_dictionaries({"input": words, "output": words}), max_size=4))
def test_dataset_loader_on_random_json_is_a_dataset_or_a_clear_error(tmp_path_factory, value):
    path = dataset_file(tmp_path_factory, value)
    try:
        ds = load_task_dataset(path)
    except FvkitError as err:
        text = str(err)
        assert "\n" not in text and path in text and re.search(r"input|output|list|object|JSON", text)
        return
    assert len(ds) >= 1 and all(isinstance(r["input"], str) and isinstance(r["output"], str) for r in ds.rows)


@pytest.mark.filterwarnings("ignore::fvkit.errors.DataWarning")
@given(raw=st.binary(max_size=64))
def test_dataset_loader_on_random_bytes_never_raises_a_traceback(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("ds") / "task.json"
    path.write_bytes(raw)
    try:
        load_task_dataset(str(path))
    except FvkitError:
        pass
