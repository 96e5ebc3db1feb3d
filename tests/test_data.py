import json

import pytest

from fvkit.method.data import load_task_dataset, split_indices
from fvkit.errors import DataError


@pytest.mark.parametrize("n_rows,seed", [(312, 0), (293, 42), (100, 7), (11, 3)])
def test_split_matches_scikit_learn_twice(n_rows, seed):
    sklearn = pytest.importorskip("sklearn.model_selection")
    rows = list(range(n_rows))
    train, rest = sklearn.train_test_split(rows, test_size=0.3, random_state=seed)
    test, valid = sklearn.train_test_split(rest, test_size=0.3, random_state=seed)
    assert split_indices(n_rows, 0.3, seed) == {"train": train, "valid": valid, "test": test}


def test_split_is_a_partition():
    split = split_indices(312, 0.3, 0)
    everything = split["train"] + split["valid"] + split["test"]
    assert sorted(everything) == list(range(312))
    assert (len(split["train"]), len(split["valid"]), len(split["test"])) == (218, 29, 65)


def write(tmp_path, obj, name="task.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_missing_column_names_the_column(tmp_path):
    path = write(tmp_path, [{"input": "a", "output": "b"}, {"input": "c"}])
    with pytest.raises(DataError, match=r"entry 1 has no 'output' column"):
        load_task_dataset(str(path))


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ({"input": "a"}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    (["a"], "entry 0 is str"),
    ([{"input": 1, "output": "b"}], "column 'input' is int"),
])
def test_malformed_dataset_messages(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        load_task_dataset(str(write(tmp_path, content)))


def test_name_lookup_in_reference_layout(tmp_path):
    (tmp_path / "abstractive").mkdir()
    write(tmp_path / "abstractive", [{"input": "a", "output": "b"}], "toy.json")
    ds = load_task_dataset("toy", data_dir=str(tmp_path))
    assert ds.name == "toy" and ds.pair(0) == ("a", "b") and len(ds.sha256) == 64


def test_unknown_dataset_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=r"dataset 'nope' not found: looked for .*nope.json"):
        load_task_dataset("nope", data_dir=str(tmp_path))


def test_shipped_datasets_load():
    for name in ("antonym", "present-past", "capitalize"):
        assert len(load_task_dataset(name)) >= 200
