"""``fvkit parity``: the parity suite behind the flags of the script it replaces.

    fvkit parity --model_name tiny-llama --dataset_name antonym --max_trials 1 --n_top_heads 5 --edit_layer 1
    fvkit parity --fixed_trials_id fixed_trials_antonym_t10_s10_seed0 --fail_fast 1 -- -n 2 -k mean_activations

The old underscore flags are translated into the plugin's options and one
pytest session runs ``parity_tests/`` (``pytest.main``); anything after ``--``
goes to pytest unchanged. The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fvkit.method.data import DEFAULT_DATA_DIR
from fvkit.method.run_defaults import DEFAULT_DATASET
from fvkit.errors import FvkitError

#: The repository checkout fvkit runs from (parity_tests/ lives beside the package).
REPO_ROOT = Path(__file__).resolve().parents[2]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "parity", help="run the parity suite against the reference (pytest on parity_tests/)",
        description=__doc__.split("\n")[0])
    p.add_argument("--model_name", "--model", dest="models", action="append", default=None,
                   help="model(s) to check: zoo alias, hub id or local path; repeat or separate with commas "
                        "(default: every tiny zoo model)")
    p.add_argument("--model_spec", "--model-spec", dest="model_spec", default=None,
                   help="registered ModelSpec for the --model models (default: chosen from each model)")
    p.add_argument("--dataset_name", "--dataset", dest="dataset", default=None,
                   help=f"task dataset: a name in --data_dir or a JSON file (default: {DEFAULT_DATASET})")
    p.add_argument("--data_dir", "--data-dir", dest="data_dir", default=None,
                   help="directory holding the datasets (default: the checkout's datasets/)")
    p.add_argument("--fixed_trials_path", "--fixed-trials", dest="fixed_trials_path", default=None,
                   help="fixed-trials file (default: <data_dir>/fixed_trials/fixed_trials_<dataset>_t10_s10_seed0.json)")
    p.add_argument("--fixed_trials_id", dest="fixed_trials_id", default=None,
                   help="fixed-trials id, looked up as <data_dir>/fixed_trials/<id>.json")
    p.add_argument("--max_trials", "--max-trials", dest="max_trials", type=int, default=None,
                   help="use only the first N trials for mean activations and indirect effect (default: all)")
    p.add_argument("--n_top_heads", "--n-top-heads", dest="n_top_heads", type=int, default=None,
                   help="heads in the function vector (default: 10, capped at the model's head count)")
    p.add_argument("--edit_layer", "--edit-layer", dest="edit_layer", type=edit_layer_value, default=None,
                   help="layer to inject at (default: n_layers // 2); 'all' or -1 (the reference's spelling) "
                        "also checks the layer sweep")
    p.add_argument("--ie_mode", "--ie-mode", dest="ie_mode", default=None, choices=("both", "exact", "fast"),
                   help="indirect-effect modes M3 checks (default: both)")
    p.add_argument("--seed", type=int, default=None, help="seed for trials drawn when no trials file is used (default: 0)")
    p.add_argument("--fail_fast", "--fail-fast", dest="fail_fast", type=switch_value, nargs="?", const=True,
                   default=False, metavar="0|1",
                   help="1: after a model's first failing gate, skip its later gates; 0: run them all "
                        "(the old script took a value; alone, the flag means 1)")
    p.add_argument("--reference_src", "--reference-src", dest="reference_src", default=None,
                   help="checkout of the reference code (the folder holding src/); enables live reference runs")
    p.add_argument("--baukit", default=None, help="checkout of baukit, needed by the live reference run")
    p.add_argument("--snapshot_update", "--snapshot-update", dest="snapshot_update", action="store_true",
                   help="write the live reference's numbers as snapshots (needs --reference_src)")
    p.add_argument("--tests", default=None, help="the parity_tests folder (default: the checkout's)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: arguments passed to pytest as they are")
    p.set_defaults(func=cmd_parity)


#: Spellings of a yes/no value, as the old script's ``--fail_fast 0|1`` took them.
SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
                 "off": False}


def switch_value(text: str) -> bool:
    """0 or 1 (also true/false, yes/no, on/off)."""
    try:
        return SWITCH_VALUES[str(text).strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}") from None


def edit_layer_value(text: str) -> str:
    """A layer number, or 'all' for the sweep (the reference's -1 means the same)."""
    from fvkit.parity.options import SWEEP_ALL  # (options imports pytest, only needed once a command runs)

    value = str(text).strip().lower()
    if value in (SWEEP_ALL, "-1"):
        return SWEEP_ALL
    try:
        return str(int(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer number, 'all' or -1, got {text!r}") from None


def resolve_trials_path(args) -> str | None:
    """--fixed_trials_path, or the file --fixed_trials_id names; both must agree."""
    path = args.fixed_trials_path
    if args.fixed_trials_id:
        data_dir = Path(args.data_dir) if args.data_dir else DEFAULT_DATA_DIR
        by_id = data_dir / "fixed_trials" / f"{args.fixed_trials_id}.json"
        if path is None:
            if not by_id.is_file():
                raise FvkitError(f"--fixed_trials_id {args.fixed_trials_id}: no file {by_id}; create it with "
                                 f"`fvkit trials` or pass --fixed_trials_path")
            path = str(by_id)
        else:
            try:
                file_id = json.loads(Path(path).read_text()).get("id")
            except (OSError, ValueError, AttributeError) as err:
                raise FvkitError(f"--fixed_trials_path {path} cannot be read as a fixed-trials file ({err})") from None
            if file_id != args.fixed_trials_id:
                raise FvkitError(f"--fixed_trials_path {path} holds trials '{file_id}', not --fixed_trials_id "
                                 f"'{args.fixed_trials_id}'; pass one of the two, or matching ones")
    return path


def pytest_arguments(args) -> list:
    """The pytest command line equivalent to the script's flags."""
    tests = Path(args.tests) if args.tests else REPO_ROOT / "parity_tests"
    if not (tests / "conftest.py").is_file():
        raise FvkitError(f"parity tests not found at {tests}; run fvkit from a checkout of its repository "
                         f"(pip install -e .) or pass --tests PATH")
    out = [str(tests)]
    for entry in args.models or []:
        for name in entry.split(","):
            if name.strip():
                out += ["--model", name.strip()]
    pairs = (("--model-spec", args.model_spec), ("--dataset", args.dataset), ("--data-dir", args.data_dir),
             ("--fixed-trials", resolve_trials_path(args)), ("--max-trials", args.max_trials),
             ("--n-top-heads", args.n_top_heads), ("--edit-layer", args.edit_layer), ("--ie-mode", args.ie_mode), ("--seed", args.seed),
             ("--reference-src", args.reference_src), ("--baukit", args.baukit))
    for flag, value in pairs:
        if value is not None:
            out += [flag, str(value)]
    if args.fail_fast:
        out.append("--fail-fast")
    if args.snapshot_update:
        out.append("--snapshot-update")
    extra = list(args.pytest_args or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    return out + extra


def cmd_parity(args) -> int:
    import pytest

    argv = pytest_arguments(args)
    print("pytest " + " ".join(argv))
    return int(pytest.main(argv))
