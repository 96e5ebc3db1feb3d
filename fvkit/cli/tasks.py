"""``fvkit run`` over several tasks on one model load.

    fvkit run --model smollm2-135m --dataset present-past --dataset capitalize --out DIR
    fvkit run --model smollm2-135m --tasks tasks.txt            # one dataset per line

Each task gets its own run folder, exactly what a single-task run writes
(``DIR/<task>/``, or each task's default folder without ``--out``), and a table
across tasks (``summary.csv``, ``summary.md``: see :mod:`fvkit.report.task_summary`)
goes to ``--out`` (default ``results_fv/task_summary/<model>/``). Every task's
inputs and folder are checked before the model loads.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fvkit.errors import FvkitError
from fvkit.method.run_defaults import DEFAULT_DATASET
from fvkit.output_location import check_output_file

def read_task_file(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise FvkitError(f"--tasks {path} is not a file; pass a text file naming one task dataset per line")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    if not names:
        raise FvkitError(f"--tasks {path} names no task; write one dataset name or JSON path per line")
    return names


def task_names(args) -> list:
    """--dataset values, then --tasks file lines; the default dataset when neither is given."""
    names = list(args.dataset or [])
    if getattr(args, "tasks", None):
        names += read_task_file(args.tasks)
    names = names or [DEFAULT_DATASET]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise FvkitError(f"task {', '.join(repeated)} is given more than once; name each task once")
    if len(names) > 1 and args.fixed_trials:
        raise FvkitError("--fixed-trials names one task's trials; with several tasks leave it out (each task uses "
                         "its own default trials file)")
    return names


def summary_dir(args) -> Path:
    from fvkit.cli.pipeline import default_run_dir

    if args.out is not None:
        return Path(args.out)
    return Path("results_fv") / "task_summary" / default_run_dir("x", args.model).name


def run_tasks(args, names: list) -> int:
    from fvkit.cli.pipeline import (check_seed, load_checked_model, parse_edit_layer, prepare_task, run_settings,
                                    run_task)
    from fvkit.cli.device_options import placement_kwargs
    from fvkit.method.data import atomic_write_bytes
    from fvkit.pipeline import check_run_settings
    from fvkit.report.task_summary import summary_files, summary_row

    check_seed(args.seed)
    parse_edit_layer(args.edit_layer)
    placement_kwargs(args)
    tasks = []
    for name in names:
        out = None if args.out is None else Path(args.out) / Path(name).stem
        tasks.append(prepare_task(args, name, out))
    folders = [out for _, _, out in tasks]
    if len(set(folders)) < len(folders):
        raise FvkitError(f"two tasks would write the same run folder ({', '.join(folders)}); give datasets with "
                         f"different names")
    where = summary_dir(args)
    for name in ("summary.csv", "summary.md"):
        check_output_file(where / name, "--out (the summary table)")
    lm = load_checked_model(args)
    for ds, trials, _ in tasks:
        check_run_settings(lm, ds, trials, **run_settings(args, lm))
    print(lm.diagnostics_table(), file=sys.stderr)
    rows = []
    for ds, trials, out in tasks:
        print(f"task {ds.name} -> {out}", file=sys.stderr)
        result, _ = run_task(args, lm, ds, trials, out)
        rows.append(summary_row(ds.name, result))
    n_shots = tasks[0][1].n_shots
    for name, data in summary_files(rows, lm.name, n_shots).items():
        atomic_write_bytes(where / name, data)
    print((where / "summary.md").read_text())
    print(f"wrote {where / 'summary.csv'} and {where / 'summary.md'}")
    return 0
