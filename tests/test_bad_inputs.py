"""Bad inputs through the real command line and the parity suite's options.

Every case ends with exit status 2 and ONE line on stderr that names the thing
and the fix, with no traceback; and an earlier good result (a complete run in
the ``--out`` directory the failing command targets, an earlier trials file, an
earlier parity report) is byte-identical afterwards.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fvkit.cli.main import main
from fvkit.models import zoo

REPO = Path(__file__).resolve().parents[1]
TRIALS = REPO / "datasets/fixed_trials/fixed_trials_antonym_t10_s10_seed0.json"
#: The zoo cache as seen before pytester points HOME at a temporary directory.
REAL_CACHE = zoo.cache_root()
QUICK = ["--model", "tiny-gpt2", "--dataset", "antonym", "--max-trials", "1", "--n-top-heads", "4", "--edit-layer", "1"]


def cli(argv) -> int:
    """``fvkit ARGV``'s exit status; argparse's usage errors end in SystemExit, as on the command line."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A complete earlier run that every failing command below targets with --out."""
    out = tmp_path_factory.mktemp("good") / "run"
    assert main(["run", *QUICK, "--fixed-trials", str(TRIALS), "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_out(good_run, tmp_path):
    """A private copy of the good run, and its bytes to compare with afterwards."""
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    return out, snapshot(out)


def trials_edit(edit):
    def make(tmp_path: Path) -> str:
        data = json.loads(TRIALS.read_text())
        edit(data)
        path = tmp_path / "edited_trials.json"
        path.write_text(json.dumps(data))
        return str(path)
    return make


def long_dataset(tmp_path: Path) -> str:
    """Rows long enough that ten demonstrations overflow GPT-2's 1,024 positions."""
    rows = [{"input": " ".join(["word"] * 150) + f" {i}", "output": f"out{i}"} for i in range(40)]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(rows))
    return str(path)


def _set(path, value):
    def edit(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return edit


def _overlap(d):
    d["split"]["test"][0] = d["split"]["train"][0]


# (case id, extra argv for `fvkit run` (callables get tmp_path), expected fragment of the one line)
RUN_CASES = [
    ("out-is-a-file", {"--out": lambda t: _touch(t / "afile")}, "is an existing file; pass a directory path"),
    ("out-below-a-file", {"--out": lambda t: str(Path(_touch(t / "afile")) / "sub")}, "is a file, not a folder"),
    ("out-holds-user-files", {"--out": lambda t: _user_dir(t)}, "is not an fvkit run directory"),
    ("out-run-plus-user-notes", {"--out": "NOTES"}, "holds files that fvkit did not write (notes.txt)"),
    ("seed-negative", {"--seed": "-1"}, "--seed must be between 0 and 4294967295, got -1"),
    ("dataset-is-a-directory", {"--dataset": lambda t: str(t)}, "is a directory; pass a JSON file"),
    ("max-trials-above-file", {"--max-trials": "11"}, "--max-trials 11 is more than the 10 trials"),
    ("max-trials-zero", {"--max-trials": "0"}, "--max-trials must be at least 1, got 0"),
    ("max-trials-not-a-number", {"--max-trials": "ten"}, "argument --max-trials: invalid int value: 'ten'"),
    ("edit-layer-word", {"--edit-layer": "middle"}, "--edit-layer must be a layer number or 'all'"),
    ("edit-layer-out-of-range", {"--edit-layer": "7"}, "layer 7 is out of range for this model"),
    ("n-top-heads-too-many", {"--n-top-heads": "1000"}, "--n-top-heads 1000 is outside 1..9"),
    ("model-unknown", {"--model": "no-such-model"}, "no-such-model"),
    ("trials-missing", {"--fixed-trials": "missing.json"}, "does not exist; create one with `fvkit trials`"),
    ("trials-negative-split-index", {"--fixed-trials": trials_edit(_set(["split", "train", 0], -1))},
     "split.train[0] is -1, not a row index"),
    ("trials-split-index-out-of-range", {"--fixed-trials": trials_edit(_set(["split", "valid", 0], 10_000))},
     "split.valid[0] is 10000, not a row index"),
    ("trials-train-row-in-test", {"--fixed-trials": trials_edit(_overlap)}, "in both split.train and split.test"),
    ("trials-n-trials-mismatch", {"--fixed-trials": trials_edit(_set(["n_trials"], 9))},
     "'n_trials' is 9 but stages.mean_activations lists 10 trials"),
    ("trials-n-shots-mismatch", {"--fixed-trials": trials_edit(_set(["n_shots"], 9))},
     "stages.mean_activations[0].demos lists 10 demonstrations but this stage uses 9"),
    ("trials-empty-stage", {"--fixed-trials": trials_edit(_set(["stages", "zero_shot"], []))},
     "stages.zero_shot is empty"),
    ("trials-null-label-order", {"--fixed-trials": trials_edit(_set(["stages", "shuffled", 0, "label_order"], None))},
     "stages.shuffled[0].label_order is null"),
    ("trials-negative-demo", {"--fixed-trials": trials_edit(_set(["stages", "baseline", 0, "demos", 0], -1))},
     "stages.baseline[0].demos must be train-split indices (-1"),
    ("trials-query-out-of-range", {"--fixed-trials": trials_edit(_set(["stages", "zero_shot", 0, "query"], 999))},
     "stages.zero_shot[0].query is outside the test split"),
    ("trials-other-dataset", {"--dataset": "capitalize"}, "were drawn from a dataset with sha256"),
    ("prompt-longer-than-context", {"--dataset": long_dataset, "--fixed-trials": None},
     "longer than the 1024-token context of tiny-gpt2"),
    # Rotary positions raise no error past the context: without the check the run would go on.
    ("prompt-longer-than-context-llama", {"--model": "tiny-llama", "--dataset": long_dataset, "--fixed-trials": None},
     "longer than the 1024-token context of tiny-llama"),
]


def _touch(path: Path) -> str:
    path.write_text("mine\n")
    return str(path)


def _user_dir(tmp_path: Path) -> str:
    folder = tmp_path / "thesis"
    (folder / "chapter1").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine\n")
    return str(folder)


def one_line(capsys, command: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"fvkit {command}: error: "), lines[0]
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("case, changes, fragment", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_bad_run_input_is_one_line_and_changes_nothing(run_out, tmp_path, capsys, case, changes, fragment):
    out, before = run_out
    if changes.get("--out") == "NOTES":
        (out / "notes.txt").write_text("my notes\n")
        before = snapshot(out)
        changes = {}
    options = {**dict(zip(QUICK[::2], QUICK[1::2])), "--fixed-trials": str(TRIALS), "--out": str(out)}
    for flag, value in changes.items():
        options[flag] = value(tmp_path) if callable(value) else value
    argv = ["run"] + [x for flag, value in options.items() if value is not None for x in (flag, value)]
    capsys.readouterr()
    assert cli(argv) == 2
    line = one_line(capsys, "run")
    assert fragment in line, line
    assert snapshot(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    if case == "out-holds-user-files":
        assert (Path(options["--out"]) / "notes.txt").read_text() == "mine\n"


def test_read_only_file_system_is_refused_before_any_work(run_out, tmp_path, capsys, monkeypatch):
    """EROFS cannot be produced without a mount (and root ignores permissions): the probe is made to see it."""
    import fvkit.output_location as location

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    out, before = run_out
    monkeypatch.setattr(location.os, "mkdir", read_only)
    argv = ["run", *QUICK, "--fixed-trials", str(TRIALS), "--out", str(out)]
    assert cli(argv) == 2
    assert "(the file system is read-only); pass a writable location" in one_line(capsys, "run")
    monkeypatch.undo()
    assert snapshot(out) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder whatever its mode")
def test_unwritable_folder_is_refused_before_any_work(tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    try:
        assert cli(["run", *QUICK, "--fixed-trials", str(TRIALS), "--out", str(parent / "run")]) == 2
        assert "cannot write in" in one_line(capsys, "run")
    finally:
        parent.chmod(0o700)


TRIALS_CASES = [
    ("seed-negative", ["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    ("n-trials-zero", ["--n-trials", "0"], "n_trials and n_shots must be at least 1"),
    ("n-shots-too-many", ["--n-shots", "500"], "n_shots=500 exceeds the"),
    ("test-size-one", ["--test-size", "1.0"], "test_size must be between 0 and 1"),
    ("dataset-is-a-directory", ["--dataset", "DIR"], "is a directory; pass a JSON file"),
    ("dataset-unknown", ["--dataset", "no-such-task"], "dataset 'no-such-task' not found"),
    ("out-is-a-directory", ["--out", "DIR"], "is a directory; pass a file path"),
    ("out-below-a-file", ["--out", "FILE/x.json"], "is a file, not a folder"),
]


@pytest.mark.parametrize("case, args, fragment", TRIALS_CASES, ids=[c[0] for c in TRIALS_CASES])
def test_bad_trials_input_is_one_line_and_changes_nothing(tmp_path, capsys, case, args, fragment):
    earlier = tmp_path / "earlier.json"
    shutil.copy(TRIALS, earlier)
    (tmp_path / "afile").write_text("mine\n")
    values = {"DIR": str(tmp_path), "FILE/x.json": str(tmp_path / "afile" / "x.json")}
    options = {"--dataset": "antonym", "--out": str(earlier)}
    for flag, value in zip(args[::2], args[1::2]):
        options[flag] = values.get(value, value)
    argv = ["trials"] + [x for kv in options.items() for x in kv]
    assert cli(argv) == 2
    assert fragment in one_line(capsys, "trials")
    assert earlier.read_bytes() == TRIALS.read_bytes()


def test_duplicate_rows_warn_in_one_line(tmp_path, capsys):
    rows = json.loads((REPO / "datasets/antonym.json").read_text())
    path = tmp_path / "dups.json"
    path.write_text(json.dumps(rows + rows[:3]))
    assert main(["trials", "--dataset", str(path), "--out", str(tmp_path / "t.json")]) == 0
    warn = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warn) == 1 and warn[0].startswith("fvkit trials: warning: dataset ")
    assert "3 duplicate row(s)" in warn[0]


def test_real_executable_gives_no_traceback(run_out, tmp_path):
    """The installed entry point, not just main(): one line, exit 2, output untouched."""
    out, before = run_out
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fvkit.cli", "run", *QUICK, "--fixed-trials", str(TRIALS),
                           "--max-trials", "11", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
    assert "--max-trials 11 is more than the 10 trials" in lines[0]
    assert snapshot(out) == before


def test_run_directory_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["run", *QUICK, "--fixed-trials", str(TRIALS), "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755


# --- the parity suite's pytest options -------------------------------------------------
REPORT_DIR = "results_fv/antonym/fixed_trials_antonym_t10_s10_seed0"
PYTEST_CASES = [
    ("max-trials-above-file", ["--max-trials", "11"], "--max-trials 11 exceeds the 10 trials"),
    ("seed-negative", ["--seed", "-1"], "--seed must be at least 0, got -1"),
    ("dataset-is-a-directory", ["--dataset", "DIR"], "is a directory; pass a JSON file"),
    ("trials-negative-split-index", ["--fixed-trials", "NEGATIVE"], "split.train[0] is -1, not a row index"),
    ("trials-missing", ["--fixed-trials", "missing.json"], "does not exist; create one with `fvkit trials`"),
    ("report-folder-is-a-file", ["REPORT_IS_FILE"], "report folder"),
]


@pytest.fixture
def suite_copy(pytester, monkeypatch):
    monkeypatch.setenv("FVKIT_CACHE", str(REAL_CACHE))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(REPO / "parity_tests", pytester.path / "parity_tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pytest.ini", pytester.path / "pytest.ini")
    return pytester


@pytest.mark.slow  # one pytest process per case, each importing torch: about 6 s a case
@pytest.mark.parametrize("case, args, fragment", PYTEST_CASES, ids=[c[0] for c in PYTEST_CASES])
def test_bad_parity_option_is_one_line_and_changes_nothing(suite_copy, case, args, fragment):
    root = suite_copy.path
    report = root / REPORT_DIR
    if args == ["REPORT_IS_FILE"]:
        report.parent.mkdir(parents=True)
        report.write_text("mine\n")
        args = []
    else:
        report.mkdir(parents=True)
        (report / "parity_suite_report.json").write_text('{"complete": true}\n')
    data = json.loads(TRIALS.read_text())
    data["split"]["train"][0] = -1
    (root / "negative.json").write_text(json.dumps(data))
    values = {"DIR": str(root), "NEGATIVE": str(root / "negative.json")}
    args = [values.get(a, a) for a in args]
    before = snapshot(root / "results_fv")
    result = suite_copy.runpytest_subprocess("parity_tests", "--model", "tiny-gpt2", "--dataset", "antonym", "--data-dir",
                                             str(REPO / "datasets"), "-p", "no:cacheprovider", *args, timeout=300)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = [line for line in result.stderr.lines if line.strip()]
    assert len(err) == 1 and fragment in err[0] and "Traceback" not in result.stderr.str(), err
    assert snapshot(root / "results_fv") == before
