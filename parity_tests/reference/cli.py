"""The command line of the reference runner (manual use; see ``docs/reference_runner.md``).

    python -m parity_tests.reference --model tiny-llama --dataset datasets/antonym.json \\
        --fixed-trials F.json --reference-src /path/to/function_vectors --baukit /path/to/baukit \\
        --max-trials 4 --n-top-heads 10 --edit-layer 1 --out result.json

A wrong path or setting ends in one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fvkit.errors import FvkitError
from fvkit.method.run_defaults import DEFAULT_N_SHOTS, DEFAULT_N_TOP_HEADS, DEFAULT_N_TRIALS, DEFAULT_SEED

from .keys import INJECTION_GATE, INVALID_KEY
from .loading import load_reference
from .run import run_reference


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity_tests.reference",
                                description="Run the reference function_vectors code on a fvkit-loaded model "
                                            "and write the comparable result dict as JSON.")
    p.add_argument("--model", required=True, help="model alias, id or local directory (fvkit.models.loader.load_model)")
    p.add_argument("--model-spec", default=None, help="ModelSpec name, when it cannot be inferred")
    p.add_argument("--dataset", required=True, help="task dataset JSON file")
    p.add_argument("--fixed-trials", default=None, help="fixed-trials file; without it, trials are drawn from "
                                                        "--n-trials/--n-shots/--seed")
    p.add_argument("--n-trials", type=int, default=DEFAULT_N_TRIALS)
    p.add_argument("--n-shots", type=int, default=DEFAULT_N_SHOTS)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--reference-src", default=os.environ.get("FVKIT_REFERENCE_SRC"),
                   help="function_vectors checkout (folder holding src/); default $FVKIT_REFERENCE_SRC")
    p.add_argument("--baukit", default=os.environ.get("FVKIT_BAUKIT"),
                   help="baukit checkout; default $FVKIT_BAUKIT or the installed baukit")
    p.add_argument("--max-trials", type=int, default=None)
    p.add_argument("--n-top-heads", type=int, default=DEFAULT_N_TOP_HEADS)
    p.add_argument("--edit-layer", type=int, required=True)
    p.add_argument("--sweep", action="store_true", help="also evaluate with the vector at every layer "
                                                        "(the reference's --edit_layer -1)")
    p.add_argument("--progress", action="store_true", help="show the reference's progress bars")
    p.add_argument("--out", required=True, help="where to write the result JSON (written atomically)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.reference_src:
            raise FvkitError("no reference checkout given; pass --reference-src PATH or set FVKIT_REFERENCE_SRC")
        from fvkit.method.data import atomic_write_text, load_task_dataset
        from fvkit.method.fixed_trials import FixedTrials
        from fvkit.models.loader import load_model

        load_reference(args.reference_src, args.baukit)  # a wrong path fails before the model loads
        dataset = load_task_dataset(args.dataset)
        if args.fixed_trials:
            trials = FixedTrials.load(args.fixed_trials, dataset)
        else:
            trials = FixedTrials.make(dataset, n_trials=args.n_trials, n_shots=args.n_shots, seed=args.seed)
        lm = load_model(args.model, model_spec=args.model_spec)

        def fvkit_vector():
            """fvkit's vector at the same settings, for a model whose vector the reference cannot build."""
            from fvkit.pipeline import run_pipeline

            return run_pipeline(lm, dataset, trials, n_top_heads=args.n_top_heads, edit_layer=args.edit_layer,
                                max_trials=args.max_trials, ie_mode="exact", show_progress=False).function_vector

        result = run_reference(lm, dataset.path, trials, reference_src=args.reference_src, baukit=args.baukit,
                               n_top_heads=args.n_top_heads, edit_layer=args.edit_layer,
                               max_trials=args.max_trials, progress=args.progress, sweep=args.sweep,
                               injected_vector=fvkit_vector)
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    except FvkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = result["meta"]
    print(f"wrote {args.out}: reference {meta['reference_commit'][:12]}, transformers {meta['transformers']}, "
          f"{meta['timings']['total']:.1f}s")
    for key, reason in meta["unsupported"].items():
        print(f"  unsupported {key}: {reason}")
    if meta.get("injected_vector"):
        record = meta["injected_vector"]
        print(f"  {', '.join(record['stages'])}: the reference evaluated fvkit's function vector "
              f"(norm {record['norm']:.6g}, sha256 {record['sha256'][:12]})")
    if meta["invalid"][INVALID_KEY]:
        print(f"  {INJECTION_GATE} invalid: {meta['invalid'][INVALID_KEY]}")
    return 0
