"""``fvkit trials`` and ``fvkit run``.

    fvkit trials --dataset datasets/antonym.json --n-trials 10 --n-shots 10 --seed 0 --out FILE
    fvkit run --model tiny-gpt2     # every default: present-past, its shipped trials, results_fv/present-past/fvkit_run/tiny-gpt2
    fvkit run --model tiny-gpt2 --dataset antonym --fixed-trials FILE --n-top-heads 9 --edit-layer 1 --out DIR
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from fvkit.method.data import DEFAULT_DATA_DIR, load_task_dataset
from fvkit.errors import FvkitError
from fvkit.method.fixed_trials import FixedTrials, trials_id
from fvkit.method.run_defaults import (DEFAULT_DATASET, DEFAULT_EDIT_LAYER_TEXT, DEFAULT_EVAL_BATCH_SIZE,
                                       DEFAULT_EVAL_METHOD, DEFAULT_N_SHOTS, DEFAULT_N_TOP_HEADS, DEFAULT_N_TRIALS,
                                       DEFAULT_IE_MODE, DEFAULT_SEED, EVAL_METHODS, IE_MODES, TIE_POLICIES)
from fvkit.output_location import check_output_file
from fvkit.cli.device_options import add_device_group, placement_kwargs, with_threads

DEFAULT_TRIALS_DIR = DEFAULT_DATA_DIR / "fixed_trials"
#: numpy.random.RandomState accepts seeds below 2**32.
SEED_LIMIT = 2 ** 32


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("trials", help="write a fixed-trials file (every random draw of every stage)")
    p.add_argument("--dataset", required=True, help="task dataset: a JSON file or a name in --data-dir")
    p.add_argument("--data-dir", default=None, help="directory holding the datasets (default: the checkout's datasets/)")
    p.add_argument("--n-trials", type=int, default=DEFAULT_N_TRIALS, help="trials per stage")
    p.add_argument("--n-shots", type=int, default=DEFAULT_N_SHOTS, help="demonstrations per prompt")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the split and of every draw")
    p.add_argument("--test-size", type=float, default=0.3, help="share of the rows held out for testing")
    p.add_argument("--out", default=None,
                   help="output file (default: datasets/fixed_trials/<id>.json, written only when no such file "
                        "exists or it holds the same trials; the shipped files are never replaced)")
    p.set_defaults(func=cmd_trials)

    p = subparsers.add_parser("run", help="run every stage on one model and write the stage files")
    p.add_argument("--model", required=True, help="zoo alias, hub id or local path")
    p.add_argument("--model-spec", default=None, help="registered ModelSpec name (default: chosen from the model)")
    add_task_arguments(p)
    p.add_argument("--data-dir", default=None, help="directory holding the datasets (default: the checkout's datasets/)")
    p.add_argument("--fixed-trials", default=None,
                   help=f"fixed-trials file (default: datasets/fixed_trials/fixed_trials_<dataset>_t{DEFAULT_N_TRIALS}_"
                        f"s{DEFAULT_N_SHOTS}_seed<seed>.json, generated into --out when absent)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed for trials generated on the fly")
    p.add_argument("--max-trials", type=int, default=None,
                   help="use only the first N trials for mean activations and indirect effect (default: all)")
    p.add_argument("--n-top-heads", type=int, default=None,
                   help=f"heads in the function vector (default: {DEFAULT_N_TOP_HEADS}, or every head of a model "
                        f"with fewer)")
    p.add_argument("--edit-layer", default=None,
                   help=f"layer to inject at (default: {DEFAULT_EDIT_LAYER_TEXT}); 'all' also sweeps every layer "
                        "(layer_sweep.json, layer_sweep.png) while the stage files use the default layer")
    p.add_argument("--ie-mode", choices=IE_MODES, default=None,
                   help=f"indirect-effect computation (default: {DEFAULT_IE_MODE})")
    add_evaluation_arguments(p)
    add_device_group(p)
    p.add_argument("--out", default=None,
                   help="output directory (default: results_fv/<dataset>/fvkit_run/<model>, in the current directory); "
                        "with several tasks, the folder holding one run folder per task and the summary table")
    p.set_defaults(func=with_threads(cmd_run))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got '{text}'")
    return value


def add_evaluation_arguments(p) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-method", choices=EVAL_METHODS, default=DEFAULT_EVAL_METHOD,
                   help="cached: one whole pass per prompt, its last token re-run per layer (default); exact: the "
                        "reference's passes per prompt, condition and layer; batched: --eval-batch-size prompts per "
                        "pass (pays off on a GPU)")
    g.add_argument("--eval-batch-size", type=positive_int, default=DEFAULT_EVAL_BATCH_SIZE,
                   help=f"prompts per pass of --eval-method batched (default {DEFAULT_EVAL_BATCH_SIZE})")
    g.add_argument("--eval-ties", choices=TIE_POLICIES, default=TIE_POLICIES[0],
                   help="a rank read within float noise of a tie: rerun it as a whole prompt alone, so ranks equal "
                        "the exact method's (default), or report it only")


def check_seed(seed: int) -> None:
    """numpy's RandomState takes seeds 0..2**32-1; say so before it raises ValueError."""
    if not 0 <= seed < SEED_LIMIT:
        raise FvkitError(f"--seed must be between 0 and {SEED_LIMIT - 1}, got {seed}")


def cmd_trials(args) -> int:
    check_seed(args.seed)
    if args.out:
        check_output_file(args.out, "--out")
    ds = load_task_dataset(args.dataset, args.data_dir)
    trials = FixedTrials.make(ds, args.n_trials, args.n_shots, args.seed, args.test_size)
    if args.out:
        out = Path(args.out)
    else:
        out = DEFAULT_TRIALS_DIR / f"{trials.id}.json"
        check_no_overwrite(out, trials)
        check_output_file(out, "--out")
    trials.save(out)
    print(f"wrote {out} ({trials.id}: split {len(trials.split['train'])}/{len(trials.split['valid'])}/"
          f"{len(trials.split['test'])} train/valid/test rows)")
    return 0


def check_no_overwrite(path: Path, trials: FixedTrials) -> None:
    """The default trials directory holds the shipped files every snapshot was made
    with: a different draw under the same id must go elsewhere (``--out``), or the
    suite would compare the reference's numbers against other trials."""
    if not path.is_file():
        return
    try:
        same = json.loads(path.read_text()) == json.loads(json.dumps(trials.as_dict()))
    except (OSError, ValueError):
        same = False
    if not same:
        raise FvkitError(f"{path} already holds other trials under the id {trials.id} (the id does not record "
                         f"--test-size); it is left as it is: pass --out FILE to write these trials elsewhere")


def resolve_trials(dataset, path, seed: int, fallback_dir: Path) -> FixedTrials:
    """An explicit file, else the shipped default for the dataset, else new trials saved beside the run."""
    if path:
        return FixedTrials.load(path, dataset)
    default = DEFAULT_TRIALS_DIR / f"{trials_id(dataset.name, DEFAULT_N_TRIALS, DEFAULT_N_SHOTS, seed)}.json"
    if default.is_file():
        return FixedTrials.load(default, dataset)
    trials = FixedTrials.make(dataset, DEFAULT_N_TRIALS, DEFAULT_N_SHOTS, seed)
    check_output_file(fallback_dir / f"{trials.id}.json", "--out (its folder, for the generated trials)")
    trials.save(fallback_dir / f"{trials.id}.json")
    return trials


def parse_edit_layer(value):
    if value is None or sweeps_all_layers(value):
        return None
    try:
        return int(value)
    except ValueError:
        raise FvkitError(f"--edit-layer must be a layer number or 'all', got {value!r}") from None


def sweeps_all_layers(value) -> bool:
    return value is not None and str(value).strip().lower() == "all"


def fitted_top_heads(requested, lm) -> int:
    """--n-top-heads, or the default capped at the model's head count (a tiny model
    may have fewer than ten heads in all); an explicit value is checked by the pipeline."""
    if requested is not None:
        return requested
    return min(DEFAULT_N_TOP_HEADS, lm.dims.n_layers * lm.dims.n_heads)


def default_run_dir(dataset_name: str, model: str) -> Path:
    """Where ``fvkit run`` writes without --out; a local path's folder name, or a hub
    id with '/' made file-safe, names the model."""
    name = Path(model).name if Path(model).is_dir() else model.replace("/", "__")
    return Path("results_fv") / dataset_name / "fvkit_run" / re.sub(r"[^\w.+-]", "_", name)


def cmd_run(args) -> int:
    from fvkit.cli.tasks import run_tasks, task_names

    names = task_names(args)
    if len(names) > 1:
        return run_tasks(args, names)
    args.dataset = names[0]
    return run_one(args)


def prepare_task(args, dataset_name: str, out=None):
    """(dataset, trials, output folder) of one task, every input checked before any model loads."""
    from fvkit.pipeline import check_max_trials, check_run_dir

    ds = load_task_dataset(dataset_name, args.data_dir)
    out = str(default_run_dir(ds.name, args.model)) if out is None else str(out)
    check_run_dir(out)
    trials = resolve_trials(ds, args.fixed_trials, args.seed, Path(out).parent)
    trials.check_dataset(ds, args.fixed_trials or trials.id)
    check_max_trials(trials, args.max_trials)
    return ds, trials, out


def load_checked_model(args):
    from fvkit.models.bos_policy import check_bos_policy
    from fvkit.models.loader import load_model

    lm = load_model(args.model, model_spec=args.model_spec, **placement_kwargs(args))
    # A spec that contradicts the tokenizer's BOS would run to the end and label the
    # first prompt token as BOS; refuse it before any stage runs.
    check_bos_policy(lm)
    return lm


def run_settings(args, lm) -> dict:
    return dict(n_top_heads=fitted_top_heads(args.n_top_heads, lm), edit_layer=parse_edit_layer(args.edit_layer),
                max_trials=args.max_trials)


def run_task(args, lm, ds, trials, out):
    """One task on a loaded model: every stage, the figures and the run folder; returns (result, sweep or None)."""
    from fvkit.pipeline import run_pipeline, write_run_outputs

    settings = run_settings(args, lm)
    kwargs = {} if args.ie_mode is None else {"ie_mode": args.ie_mode}
    result = run_pipeline(lm, ds, trials, **settings, **kwargs, sweep=sweeps_all_layers(args.edit_layer),
                          eval_method=args.eval_method, eval_ties=args.eval_ties,
                          eval_batch_size=args.eval_batch_size, block_written=True)
    # Imported only now: matplotlib's ~20 MB need not be resident during the model's passes.
    from fvkit.report.run_files import run_artifacts

    files = run_artifacts(lm, ds, trials, result, sweep=sweeps_all_layers(args.edit_layer))
    written = write_run_outputs(result, out, extra_args=vars(args) | {"func": None, "dataset": ds.name},
                                extra_files=files)
    sweep = json.loads(files["layer_sweep.json"]) if "layer_sweep.json" in files else None
    print_summary(result, trials, sweep, written)
    return result, sweep


def print_summary(result, trials, sweep, out) -> None:
    zs, sh = result.zero_shot, result.shuffled
    print(f"top heads ({result.settings['n_top_heads']}): {result.top_heads}")
    print(f"layer {result.settings['edit_layer']}: zero-shot top-1: {zs['clean_topk'][0][1]:.3f} -> {zs['intervention_topk'][0][1]:.3f}; "
          f"shuffled top-1: {sh['clean_topk'][0][1]:.3f} -> {sh['intervention_topk'][0][1]:.3f}; "
          f"clean {trials.n_shots}-shot top-1: {result.baseline['clean_topk'][0][1]:.3f}")
    for key, scale in result.vector_scale.items():
        print(f"{key.replace('_', ' ')}: norm {scale['vector_norm']:.4g} = {scale['ratio']:.3%} of the residual "
              f"stream ({scale['residual_norm']:.4g}, mean over {scale['n_prompts']} evaluation prompts' last token)")
    if result.block_written:
        bw = result.block_written
        print(f"vector as the block writes it (through {bw['attn_output_norm']}), layer {result.settings['edit_layer']}: "
              f"zero-shot top-1: {bw['zero_shot']['clean_topk'][0][1]:.3f} -> {bw['zero_shot']['intervention_topk'][0][1]:.3f}; "
              f"shuffled top-1: {bw['shuffled']['clean_topk'][0][1]:.3f} -> {bw['shuffled']['intervention_topk'][0][1]:.3f}")
    if sweep is not None:
        for stage in ("zero_shot", "shuffled"):
            best = sweep["best_layer"][stage]
            st = sweep["stages"][stage]
            print(f"layer sweep {stage}: best layer {best}, top-1 {st['clean_topk'][0][1]:.3f} -> "
                  f"{st['intervention_topk'][best][0][1]:.3f} ({sweep['seconds']:.1f}s for {sweep['n_layers']} layers)")
    print(f"wrote {out}")


def run_one(args) -> int:
    from fvkit.pipeline import check_run_settings

    # Every input and the output folder are checked before the model loads:
    # a mistake ends in seconds, not after the whole computation.
    check_seed(args.seed)
    parse_edit_layer(args.edit_layer)
    placement_kwargs(args)
    ds, trials, out = prepare_task(args, args.dataset, args.out)
    args.out = out
    lm = load_checked_model(args)
    check_run_settings(lm, ds, trials, **run_settings(args, lm))
    print(lm.diagnostics_table(), file=sys.stderr)
    run_task(args, lm, ds, trials, out)
    return 0


def add_task_arguments(p) -> None:
    p.add_argument("--dataset", action="append", default=None,
                   help=f"task dataset: a name in --data-dir or a JSON file (default: {DEFAULT_DATASET}); repeat it to run "
                        "several tasks on one model load")
    p.add_argument("--tasks", default=None,
                   help="file naming one task dataset per line (# starts a comment); added to --dataset")
