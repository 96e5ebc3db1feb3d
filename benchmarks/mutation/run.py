"""Mutation harness: run the parity suite once per named fault and tabulate which gates caught it.

    python benchmarks/mutation/run.py                          # control + every fault, tiny-llama
    python benchmarks/mutation/run.py --faults top_heads_ascending wrong_separator
    python benchmarks/mutation/run.py --model smollm2-135m --jobs 2   # a real checkpoint, two faults at once

Each fault (:mod:`faults`) runs in its own ``python -m pytest parity_tests``
process, in a temporary copy of the suite (parity_tests/, pytest.ini,
conftest.py; datasets/ linked), so the report the plugin writes under
``<rootdir>/results_fv`` lands in the copy and never replaces the project's own
``results_fv``. The gates' verdicts are read from that copy's
``parity_suite_report.json``. A run with no fault comes first and must pass
every gate: otherwise a "caught" fault would mean nothing, and the harness
stops.

The settings are ones with stored snapshots (parity_tests/__snapshots__), so
M1-M4 really compare against the reference's numbers: the quick settings on the
tiny models, a real checkpoint's own parity settings (ZooEntry.parity) on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

from faults import FAULTS  # noqa: E402

GATES = ("M1", "M2", "M3", "M4", "M5")
#: Settings with stored snapshots for every tiny model (the ``-mt1-nh5-el1`` snapshot files).
SUITE_ARGS = ("--max-trials", "1", "--n-top-heads", "5", "--edit-layer", "1", "-p", "no:cacheprovider")
#: Where the suite writes its latest report, whatever the default dataset and trials
#: (``results_fv/<dataset>/<fixed_trials_id>/``); the copy holds exactly one.
REPORT_GLOB = "results_fv/*/*/parity_suite_report.json"
#: A tiny-model run takes about 20 s, a real checkpoint's a few minutes; a fault that hangs
#: the suite is cut off well after that.
RUN_TIMEOUT_S = 1800
CAUGHT = ("FAIL", "ERROR")
CONTROL = "(none)"


class HarnessError(Exception):
    """The control run did not pass, or a run produced no report."""


def suite_copy(tmp: Path) -> Path:
    for name in ("parity_tests", "pytest.ini", "conftest.py"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp / name)
    (tmp / "datasets").symlink_to(ROOT / "datasets")
    return tmp


def tie_resolved(node) -> int:
    """Ranks the gates took from the reference at a float tie, anywhere in a report subtree."""
    if isinstance(node, dict):
        own = node.get("tie_resolved")
        n = sum(own.values()) if isinstance(own, dict) else 0
        return n + sum(tie_resolved(v) for k, v in node.items() if k != "tie_resolved")
    if isinstance(node, list):
        return sum(tie_resolved(v) for v in node)
    return 0


def suite_args(model: str) -> tuple:
    """The quick settings on a tiny model; on a real checkpoint its own parity settings (those
    of its stored reference numbers, ZooEntry.parity) at the default edit layer, without the
    layer sweep, which would add every layer's evaluations to each fault's run."""
    from fvkit.method.run_defaults import default_edit_layer
    from fvkit.models.loader import describe_model
    from fvkit.models.zoo import ZOO

    entry = ZOO.get(model)
    if entry is None or entry.parity is None:
        return SUITE_ARGS
    layer = default_edit_layer(describe_model(model).dims.n_layers)
    return ("--edit-layer", str(layer), "-p", "no:cacheprovider")


def run_one(model: str, fault: str | None, nice: int, args: tuple) -> dict:
    """Gate statuses (and causes) of one pytest process with ``fault`` applied."""
    with tempfile.TemporaryDirectory(prefix="fvkit-mutation-") as tmp:
        root = suite_copy(Path(tmp))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), OMP_NUM_THREADS="1")
        env.pop("FVKIT_MUTATION", None)
        if fault:
            env["FVKIT_MUTATION"] = fault
        cmd = ["nice", "-n", str(nice), sys.executable, "-m", "pytest", "parity_tests", "--model", model,
               "-k", model, *args, "-p", "fvkit_mutation_plugin", "-q"]
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
        seconds = time.monotonic() - start
        report_path = next(root.glob(REPORT_GLOB), None)
        if report_path is None:
            tail = (proc.stdout + proc.stderr)[-2000:]
            return {"fault": fault or CONTROL, "gates": {g: "NO REPORT" for g in GATES}, "causes": {},
                    "exit": proc.returncode, "seconds": seconds, "tail": tail}
        report = json.loads(report_path.read_text())
    gates = report["models"][model]["gates"]
    return {
        "fault": fault or CONTROL,
        "gates": {g: gates.get(g, {}).get("status", "—") for g in GATES},
        "causes": {g: (gates[g].get("cause") or "")[:300] for g in GATES
                   if g in gates and gates[g].get("status") in CAUGHT},
        "tie_resolved": tie_resolved(report["models"][model]),
        "exit": proc.returncode,
        "seconds": round(seconds, 1),
    }


def table(model: str, rows: list) -> str:
    lines = [f"| fault | stage | what | {' | '.join(GATES)} | caught by | tie-resolved ranks |",
             "|---|---|---|" + "---|" * len(GATES) + "---|---|"]
    for row in rows:
        fault = FAULTS.get(row["fault"])
        stage, what = (fault.stage, fault.what) if fault else ("—", "control: no fault, every gate must pass")
        caught = [g for g in GATES if row["gates"][g] in CAUGHT]
        by = ", ".join(caught) if fault and caught else ("**none**" if fault else "—")
        lines.append(f"| `{row['fault']}` | {stage} | {what} | "
                     + " | ".join(row["gates"][g] for g in GATES) + f" | {by} | {row.get('tie_resolved', '—')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--faults", nargs="*", default=list(FAULTS), help="fault names (default: all)")
    parser.add_argument("--nice", type=int, default=15, help="niceness of the pytest processes (default 15)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/mutation_{model}.json")
    parser.add_argument("--jobs", type=int, default=1, help="faults run at once, each in its own process (default 1)")
    parser.add_argument("--suite-extra", default="", metavar="ARGS",
                        help="more pytest arguments for the control and every fault, e.g. '--ie-mode both' to "
                             "exercise fvkit's exact indirect effect on a real checkpoint, which checks only "
                             "the fast mode by default")
    args = parser.parse_args(argv)
    # Read once: a real checkpoint's settings come from its config.
    run_args = (*suite_args(args.model), *shlex.split(args.suite_extra))
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")

    control = run_one(args.model, None, args.nice, run_args)
    print(f"control: {control['gates']} ({control['seconds']} s)", flush=True)
    if any(s != "PASS" for s in control["gates"].values()):
        raise HarnessError(f"the control run (no fault) did not pass every gate: {control}")
    def one(name):
        row = run_one(args.model, name, args.nice, run_args)
        print(f"{name}: {row['gates']} ({row['seconds']} s)", flush=True)
        return row

    # Each fault is its own pytest process; threads only wait on them.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = [control, *pool.map(one, args.faults)]

    out = Path(str(args.json).format(model=args.model))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "suite_args": list(run_args), "rows": rows},
                              indent=1) + "\n")
    print(table(args.model, rows))
    missed = [r["fault"] for r in rows[1:] if not any(s in CAUGHT for s in r["gates"].values())]
    print(f"\nnot caught by any gate: {', '.join(missed) or 'none'}\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
