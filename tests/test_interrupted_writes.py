"""SIGINT, SIGTERM and SIGKILL at each step of a run directory's final write.

Each case runs the writer in a child process that signals itself at one named
step of :func:`fvkit.run_dir.publish`; afterwards (and after :func:`recover`,
which every later run calls first) the directory must hold either the old
complete run or the new complete one, byte for byte, and no hidden folder may
be left beside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fvkit import run_dir

REPO = Path(__file__).resolve().parents[1]
OLD = {"a.pt": b"old tensor", "b.json": b'{"old": 1}\n', "run.json": b'{"run": "old"}\n'}
NEW = {"a.pt": b"new tensor " * 100, "b.json": b'{"new": 2}\n', "c.png": b"\x89PNG new", "run.json": b'{"run": "new"}\n'}
COMMON_STEPS = ["staging", "file:a.pt", "file:b.json", "file:c.png", "staged"]
#: The steps of each way of swapping the new run in.
STEPS = {"exchange": COMMON_STEPS + ["swapped"], "two-renames": COMMON_STEPS + ["old-aside", "new-in"]}
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}

CHILD = textwrap.dedent('''
    import os, signal, sys
    from fvkit import run_dir
    from fvkit.signals import Stopped, stop_on_signals

    out, at, signum, mode, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], eval(sys.argv[5])
    if mode == "two-renames":
        run_dir._exchange = lambda a, b: False
    def step(name):
        if name == at:
            os.kill(os.getpid(), signum)
    run_dir.step = step
    try:
        with stop_on_signals():
            run_dir.publish(out, new)
    except Stopped as stop:
        sys.exit(stop.exit_status)
''')


def content(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def exchange_supported(tmp_path: Path) -> bool:
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir(), b.mkdir()
    try:
        return run_dir._exchange(a, b)
    finally:
        a.rmdir(), b.rmdir()


@pytest.mark.parametrize("mode", list(STEPS))
@pytest.mark.parametrize("sig", list(SIGNALS))
def test_signal_at_every_step_leaves_old_or_new_complete(tmp_path, mode, sig):
    if mode == "exchange" and not exchange_supported(tmp_path):
        pytest.skip("this file system cannot exchange two paths in one step")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    outcomes = {}
    for at in STEPS[mode]:
        out = tmp_path / at.replace(":", "_") / "run"
        out.mkdir(parents=True)
        for name, data in OLD.items():
            (out / name).write_bytes(data)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(out), at, str(int(SIGNALS[sig])), mode, repr(NEW)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert "Traceback" not in proc.stderr, proc.stderr
        run_dir.recover(out)
        got = content(out)
        assert got in (OLD, NEW), (at, sorted(got))
        assert [p.name for p in out.parent.iterdir()] == ["run"], (at, list(out.parent.iterdir()))
        outcomes[at] = "new" if got == NEW else "old"
    # Before the swap an interrupt keeps the old run; once swapped, the new one stands.
    before_swap = [outcomes[s] for s in COMMON_STEPS]
    assert before_swap == ["old"] * len(COMMON_STEPS), outcomes
    assert outcomes[STEPS[mode][-1]] == "new", outcomes


def test_publish_never_writes_into_a_directory_with_user_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(run_dir.OutputDirError, match="notes.txt"):
        run_dir.check_replaceable(out, ["run.json"])
    assert (out / "notes.txt").read_text() == "mine"


def test_sigterm_during_a_real_run_keeps_the_earlier_run(tmp_path):
    """``fvkit run`` stopped by SIGTERM mid-computation: exit 143, one line, earlier run untouched."""
    out = tmp_path / "run"
    out.mkdir()
    earlier = {"run.json": b'{"run": "earlier"}\n', "top_heads.json": b"[]\n"}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    trials = REPO / "datasets/fixed_trials/fixed_trials_antonym_t10_s10_seed0.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fvkit.cli", "run", "--model", "tiny-gpt2", "--n-top-heads", "4", "--dataset", "antonym",
                             "--fixed-trials", str(trials), "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Wait until the model is loaded (its table is printed), so the signal lands in the computation.
    deadline = time.monotonic() + 120
    seen = ""
    while "load time" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, seen + err
    assert "Traceback" not in err and "interrupted by SIGTERM; earlier results are unchanged" in err
    assert content(out) == earlier
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
