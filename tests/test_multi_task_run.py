"""`fvkit run` over several tasks on one model load: one run folder per task and a summary table."""

import csv
import json

import pytest

import fvkit.cli.pipeline as cli_pipeline
from fvkit.cli.main import main
from fvkit.pipeline import RUN_FILES
from fvkit.report.task_summary import COLUMNS, summary_csv, summary_markdown

QUICK = ["--model", "tiny-gpt2", "--max-trials", "1", "--n-top-heads", "4", "--edit-layer", "1"]


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    loads = []
    original = cli_pipeline.load_checked_model

    def counting(args):
        loads.append(args.model)
        return original(args)

    cli_pipeline.load_checked_model = counting
    try:
        code = main(["run", *QUICK, "--dataset", "antonym", "--dataset", "capitalize", "--out", str(out)])
    finally:
        cli_pipeline.load_checked_model = original
    assert code == 0
    return out, loads


def test_one_model_load_one_run_folder_per_task(two_tasks):
    out, loads = two_tasks
    assert loads == ["tiny-gpt2"]
    for task in ("antonym", "capitalize"):
        for name in RUN_FILES:
            assert (out / task / name).is_file(), (task, name)
        run = json.loads((out / task / "run.json").read_text())
        assert run["arguments"]["dataset"] == task
        assert run["trials_id"].startswith(f"fixed_trials_{task}_")


def test_summary_table_holds_each_tasks_accuracies(two_tasks):
    out, _ = two_tasks
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["task"] for r in rows] == ["antonym", "capitalize"]
    for row in rows:
        task = row["task"]
        zs = json.loads((out / task / "eval_zero_shot.json").read_text())
        sh = json.loads((out / task / "eval_shuffled.json").read_text())
        base = json.loads((out / task / "eval_baseline.json").read_text())
        assert float(row["zero_shot"]) == zs["clean_topk"][0][1]
        assert float(row["zero_shot_fv"]) == zs["intervention_topk"][0][1]
        assert float(row["shuffled"]) == sh["clean_topk"][0][1]
        assert float(row["shuffled_fv"]) == sh["intervention_topk"][0][1]
        assert float(row["few_shot"]) == base["clean_topk"][0][1]
        assert float(row["few_shot_fv"]) == base["intervention_topk"][0][1]
    assert "| antonym | 65 | 1 |" in (out / "summary.md").read_text()


def test_task_file_and_repeated_tasks(tmp_path, capsys):
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("# two tasks\nantonym\n\nantonym  # again\n")
    assert main(["run", *QUICK, "--tasks", str(tasks), "--out", str(tmp_path / "o")]) == 2
    assert "task antonym is given more than once" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main(["run", *QUICK, "--tasks", str(empty)]) == 2
    assert "names no task" in capsys.readouterr().err
    assert main(["run", *QUICK, "--dataset", "antonym", "--dataset", "capitalize", "--fixed-trials",
                 "datasets/fixed_trials/fixed_trials_antonym_t10_s10_seed0.json"]) == 2
    assert "--fixed-trials names one task's trials" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_bad_second_task_stops_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli_pipeline, "load_checked_model", lambda args: pytest.fail("the model was loaded"))
    assert main(["run", *QUICK, "--dataset", "antonym", "--dataset", "no-such-task", "--out", str(tmp_path)]) == 2
    assert "no-such-task" in capsys.readouterr().err


def test_summary_layout_without_few_shot_vector():
    rows = [{"task": "t", "n_items": 3, "edit_layer": 2, "few_shot": 0.5, "few_shot_fv": None, "zero_shot": 0.0,
             "zero_shot_fv": 1 / 3, "shuffled": 0.25, "shuffled_fv": 1.0}]
    text = summary_markdown(rows, "m", 10)
    assert "| t | 3 | 2 | 0.500 | - | 0.000 | 0.333 | 0.250 | 1.000 |" in text
    assert summary_csv(rows).splitlines() == [",".join(k for k, _ in COLUMNS), "t,3,2,0.5,,0.0,0.3333333333333333,0.25,1.0"]
