"""Fixed-trials files: reproducible draws, the reference's draw order, and clear refusals."""

import json

import numpy as np
import pytest

from fvkit.cli.main import main
from fvkit.method.data import load_task_dataset, split_indices
from fvkit.errors import DataError
from fvkit.method.fixed_trials import STAGES, FixedTrials


def test_shipped_file_is_what_make_draws(antonym, antonym_trials):
    fresh = FixedTrials.make(antonym, n_trials=10, n_shots=10, seed=0)
    assert fresh.as_dict() == antonym_trials.as_dict()
    assert antonym_trials.id == "fixed_trials_antonym_t10_s10_seed0"


def test_draw_order_is_the_references(antonym):
    """Each stage restarts the generator; within a trial the reference draws the
    demonstrations, then the query, then (shuffled stages) the label order."""
    trials = FixedTrials.make(antonym, n_trials=3, n_shots=4, seed=5)
    split = split_indices(len(antonym), 0.3, 5)
    np.random.seed(5)
    for trial in trials.stages["indirect_effect"]:
        demos = np.random.choice(len(split["train"]), 4, replace=False)
        query = np.random.choice(np.arange(len(split["valid"])), 1, replace=False)
        outputs = [antonym.rows[split["train"][d]]["output"] for d in demos]
        shuffled = np.random.permutation(outputs)
        assert trial.demos == demos.tolist() and trial.query == query[0]
        assert [outputs[k] for k in trial.label_order] == shuffled.tolist()
    np.random.seed(5)
    for j, trial in enumerate(trials.stages["shuffled"]):
        demos = np.random.choice(len(split["train"]), 4, replace=False)
        order = np.random.permutation(4)
        assert (trial.demos, trial.query, trial.label_order) == (demos.tolist(), j, order.tolist())
    assert all(t.demos == [] and t.label_order is None for t in trials.stages["zero_shot"])


def test_pairs_apply_the_label_order(antonym, antonym_trials):
    demos, query = antonym_trials.pairs("indirect_effect", 0, antonym)
    trial = antonym_trials.stages["indirect_effect"][0]
    train = antonym_trials.split["train"]
    inputs = [antonym.rows[train[d]]["input"] for d in trial.demos]
    outputs = [antonym.rows[train[d]]["output"] for d in trial.demos]
    assert demos == [(i, outputs[k]) for i, k in zip(inputs, trial.label_order)]
    assert query == antonym.pair(antonym_trials.split["valid"][trial.query])


def test_roundtrip_and_cli(tmp_path, antonym):
    out = tmp_path / "t.json"
    assert main(["trials", "--dataset", antonym.path, "--n-trials", "2", "--n-shots", "3", "--seed", "1", "--out", str(out)]) == 0
    loaded = FixedTrials.load(out, antonym)
    assert loaded.as_dict() == FixedTrials.make(antonym, 2, 3, 1).as_dict()
    assert set(loaded.stages) == set(STAGES)


def corrupt(tmp_path, antonym, edit):
    data = FixedTrials.make(antonym, 2, 3, 0).as_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("stages"), "missing field 'stages'"),
    (lambda d: d["stages"].pop("baseline"), "missing field 'stages.baseline'"),
    (lambda d: d.update(format="other"), "'format' must be"),
    (lambda d: d["stages"]["shuffled"][0].update(label_order=[0, 0, 1]), r"label_order must be a permutation"),
    (lambda d: d["stages"]["zero_shot"][0].update(query=10_000), "query is outside the test split"),
    (lambda d: d["stages"]["mean_activations"][1].update(demos=[1, "x"]), "demos must be train-split indices"),
    (lambda d: d.update(seed="0"), "field 'seed' must be int"),
])
def test_malformed_files_name_the_field(tmp_path, antonym, edit, message):
    with pytest.raises(DataError, match=message):
        FixedTrials.load(corrupt(tmp_path, antonym, edit), antonym)


def test_other_dataset_is_refused(tmp_path, antonym, antonym_trials):
    other = tmp_path / "antonym.json"
    other.write_text(json.dumps(antonym.rows[:-1]))
    with pytest.raises(DataError, match="regenerate the trials"):
        antonym_trials.check_dataset(load_task_dataset(str(other)))


def test_not_json_and_missing(tmp_path, antonym):
    bad = tmp_path / "x.json"
    bad.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        FixedTrials.load(bad)
    with pytest.raises(DataError, match="does not exist"):
        FixedTrials.load(tmp_path / "nope.json")


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert main(["trials", "--dataset", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "o.json").exists()
