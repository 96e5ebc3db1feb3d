"""Time the all-layer sweep against evaluating each layer with whole-prompt passes.

    python benchmarks/bench_layer_sweep.py --model smollm2-135m --dataset present-past \\
        --fv /tmp/smol_pp/function_vector.pt --ref-layers 0 15 29

The sweep (:func:`fvkit.fast.sweep.layer_sweep`) runs every layer; the
per-layer method (:func:`fvkit.method.intervene.evaluate` once per layer and stage, the
reference's structure: a clean and an edited whole-prompt pass per item) runs
only on ``--ref-layers``, and its time per layer is extrapolated to all layers.
The measured layers must give identical rank lists. Results go to
``benchmarks/results/layer_sweep.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fvkit.cli.pipeline import DEFAULT_TRIALS_DIR
from fvkit.method.data import atomic_write_text, load_task_dataset
from fvkit.method.fixed_trials import FixedTrials, trials_id
from fvkit.models.loader import load_model
from fvkit.method.intervene import EVAL_STAGES, evaluate
from fvkit.fast.sweep import layer_result, layer_sweep
from fvkit.method.run_defaults import DEFAULT_N_SHOTS, DEFAULT_N_TRIALS, DEFAULT_SEED, default_edit_layer
from fvkit.pipeline import package_versions

RESULTS = Path(__file__).resolve().parent / "results" / "layer_sweep.md"
#: The speed-up the sweep is meant to reach over per-layer whole-prompt evaluation.
TARGET_SPEEDUP = 10.0


def make_vector(lm, ds, trials, max_trials: int):
    """A real function vector from the first ``max_trials`` trials, when none is given."""
    from fvkit.method.activations import mean_head_activations
    from fvkit.method.function_vector import compute_function_vector, select_top_heads
    from fvkit.pipeline import indirect_effects

    mean = mean_head_activations(lm, ds, trials, max_trials=max_trials)
    try:
        ie = indirect_effects(lm, ds, trials, mean, max_trials=max_trials, mode="fast")
    except ImportError:
        ie = indirect_effects(lm, ds, trials, mean, max_trials=max_trials, mode="exact")
    return compute_function_vector(lm, mean, select_top_heads(ie, 10)), f"computed from {max_trials} trials, 10 heads"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="present-past")
    p.add_argument("--fixed-trials", default=None)
    p.add_argument("--fv", default=None, help="function_vector.pt of an `fvkit run` (default: compute one)")
    p.add_argument("--fv-trials", type=int, default=3, help="trials used when computing the vector here")
    p.add_argument("--ref-layers", type=int, nargs="+", default=None,
                   help="layers timed with whole-prompt passes (default: first, middle, last)")
    p.add_argument("--max-items", type=int, default=None, help="items per stage (default: all test items)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)

    os.environ.setdefault("FVKIT_PROGRESS", "0")
    ds = load_task_dataset(args.dataset)
    path = args.fixed_trials or DEFAULT_TRIALS_DIR / f"{trials_id(ds.name, DEFAULT_N_TRIALS, DEFAULT_N_SHOTS, DEFAULT_SEED)}.json"
    trials = FixedTrials.load(path, ds)
    lm = load_model(args.model)
    n_layers = lm.dims.n_layers
    if args.fv:
        fv, fv_source = torch.load(args.fv), f"loaded from {args.fv}"
    else:
        fv, fv_source = make_vector(lm, ds, trials, args.fv_trials)
    ref_layers = args.ref_layers or sorted({0, default_edit_layer(n_layers), n_layers - 1})
    load_before = os.getloadavg()

    start = time.perf_counter()
    sweep = layer_sweep(lm, ds, trials, fv, max_items=args.max_items, show_progress=False)
    sweep_s = time.perf_counter() - start
    print(f"sweep over {n_layers} layers: {sweep_s:.1f}s", file=sys.stderr)

    per_layer, identical = {}, True
    for layer in ref_layers:
        start = time.perf_counter()
        runs = {s: evaluate(lm, ds, trials, s, fv, layer, max_items=args.max_items, show_progress=False)
                for s in EVAL_STAGES}
        per_layer[layer] = time.perf_counter() - start
        for s, ref in runs.items():
            mine = layer_result(sweep, s, layer)
            same = all(mine[k] == ref[k] for k in ("clean_rank_list", "intervention_rank_list"))
            identical &= same
        print(f"layer {layer} whole-prompt: {per_layer[layer]:.1f}s", file=sys.stderr)
    load_after = os.getloadavg()

    mean_layer_s = sum(per_layer.values()) / len(per_layer)
    full_s = mean_layer_s * n_layers
    speedup = full_s / sweep_s
    n_items = {s: sweep["stages"][s]["n_items"] for s in EVAL_STAGES}
    reruns = {s: sweep["stages"][s]["near_tie_reruns"] for s in EVAL_STAGES}
    gap = max(sweep["stages"][s]["cached_clean_max_abs_diff"] for s in EVAL_STAGES)
    versions = package_versions()
    lines = [
        "# Layer sweep: one cached pass vs whole-prompt passes per layer",
        "",
        f"Command: `python benchmarks/bench_layer_sweep.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| | |",
        "|---|---|",
        f"| model | {lm.name} ({n_layers} layers, {lm.dims.n_heads} heads, hidden {lm.dims.hidden_size}) |",
        f"| task / trials | {ds.name} / {trials.id} |",
        f"| items per stage | {n_items['zero_shot']} zero-shot, {n_items['shuffled']} shuffled-label (test split) |",
        f"| function vector | {fv_source} |",
        f"| sweep, all {n_layers} layers | **{sweep_s:.1f} s** (method `{sweep['method']}`) |",
        *[f"| whole-prompt `evaluate`, layer {L} (both stages) | {s:.1f} s |" for L, s in per_layer.items()],
        f"| whole-prompt, extrapolated to {n_layers} layers | **{full_s:.1f} s** ({mean_layer_s:.1f} s/layer x {n_layers}) |",
        f"| speed-up | **{speedup:.1f}x** (target {TARGET_SPEEDUP:.0f}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}) |",
        f"| rank lists of the timed layers identical to `evaluate` | {'yes' if identical else 'NO'} |",
        f"| near-tie items re-run as whole prompts | {reruns['zero_shot']} zero-shot, {reruns['shuffled']} shuffled "
        f"(of {n_items['zero_shot'] * n_layers} and {n_items['shuffled'] * n_layers} item-layers) |",
        f"| largest clean-logit gap, one-token vs whole-prompt pass | {gap:.2e} |",
        f"| machine | {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {load_before[0]:.1f} before / {load_after[0]:.1f} after |",
        f"| versions | " + ", ".join(f"{k} {v}" for k, v in versions.items()) + " |",
        "",
        "Both methods ran in the same process, one after the other, on the same prompts and vector.",
        "The per-layer method is the reference's structure: for each item a clean and an edited pass",
        "over the whole prompt. The sweep runs each prompt once, cuts its key/value cache back by one",
        "token and runs the last token in one batch of n_layers + 1 rows.",
        "",
    ]
    atomic_write_text(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
