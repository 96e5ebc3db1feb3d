"""A whole run, fvkit against the reference, measured in one invocation on the same model and data.

    python benchmarks/bench_whole_run.py --reference-src /path/to/function_vectors --baukit /path/to/baukit

The reference's code must be importable by the interpreter running this script
(it is pinned to transformers 4.49: run the script with such an environment).

Each measurement runs in a child process of its own, one after the other:

* ``fvkit``: ``run_pipeline`` on ``--model`` (default smollm2-135m) and ``--dataset``
  (default present-past) with its fixed trials: 10 trials of mean activations and
  fast indirect effect, the function vector, the zero-shot and shuffled-label
  evaluations at the edit layer, the layer sweep over every layer and the clean
  few-shot evaluation; CPU and wall time per stage, and the working set: the peak
  resident memory during the run above the runtime floor (the resident memory
  once the model has run one prompt: Python, torch, transformers, the tokenizer
  and the weights read in).
* ``reference``: the paper's code on the same model object and the same trials'
  draws: ``get_mean_head_activations`` over the 10 trials, ``compute_indirect_effect``
  for ``--reference-ie-trials`` trial(s), ``n_shot_eval`` zero-shot and
  shuffled-label at the edit layer with fvkit's function vector, and
  ``n_shot_eval_no_intervention``, each evaluation over the first
  ``--reference-items`` test items. Its whole-run time is extrapolated from these:
  mean activations as measured, the indirect effect per trial x the trials, the
  evaluations per item x the items x the layers of the sweep, the clean few-shot
  evaluation per item x the items.
* ``memory``: the same fvkit run on the GPT-2-small-shaped model of
  ``bench_indirect_effect.py`` (working set only; no reference).

Agreement: the top heads of the first trial's effects (fvkit fast vs the
reference's trial), and the rank lists of the items the reference evaluated
(zero-shot, shuffled-label and clean few-shot) against fvkit's at the edit layer.

Results: ``benchmarks/results/whole_run.md`` and ``whole_run.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_indirect_effect import load, machine, peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
#: Each child also leaves its results here as it ends, so an interrupted invocation
#: loses nothing already measured (``--from-partial`` builds the report from them).
PARTIAL = Path(tempfile.gettempdir()) / "fvkit-bench-whole-run"
N_TOP_HEADS = 10
#: Working-set criterion: at most this fraction of the model's fp32 parameter size.
WORKING_SET_FRACTION = 0.3
#: Criteria of the whole run and the indirect effect against the reference.
RUN_SPEEDUP_TARGET = 30
IE_SPEEDUP_TARGET = 100


def clock():
    return time.perf_counter(), time.process_time()


def since(start) -> dict:
    wall, cpu = clock()
    return {"wall_s": round(wall - start[0], 3), "cpu_s": round(cpu - start[1], 3)}


def load_task(dataset_name: str):
    from fvkit.method.data import load_task_dataset
    from fvkit.method.fixed_trials import FixedTrials

    ds = load_task_dataset(dataset_name)
    trials = FixedTrials.load(REPO / "datasets" / "fixed_trials" / f"fixed_trials_{ds.name}_t10_s10_seed0.json", ds)
    return ds, trials


def fp32_mb(lm) -> float:
    return sum(p.numel() for p in lm.model.parameters()) * 4 / 2**20


def runtime_floor(lm, ds, trials) -> float:
    """Resident memory once one prompt has run: every weight read in, no stage's tensors held."""
    import torch

    from fvkit.method.stage_inputs import trial_prompt

    with torch.no_grad():
        lm.model(**lm.tokenizer([trial_prompt(lm, ds, trials, "shuffled", 0)[1]], return_tensors="pt"))
    return rss_mb()


# --- fvkit ------------------------------------------------------------------------------

class _CpuClock:
    """Stands in for the ``time`` module of fvkit's stage timers: CPU seconds of this
    one-thread process, which other load on a shared machine does not inflate."""
    perf_counter = staticmethod(time.process_time)


def fvkit_worker(args) -> dict:
    import torch

    import fvkit.fast.run_evaluations
    import fvkit.fast.sweep
    import fvkit.pipeline
    from fvkit.pipeline import run_pipeline

    for module in (fvkit.pipeline, fvkit.fast.sweep, fvkit.fast.run_evaluations):
        module.time = _CpuClock

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    lm = load(args.model)
    ds, trials = load_task(args.dataset)
    floor = runtime_floor(lm, ds, trials)
    reset_peak_rss()
    start = clock()
    n_top = min(N_TOP_HEADS, lm.dims.n_layers * lm.dims.n_heads)
    result = run_pipeline(lm, ds, trials, n_top_heads=n_top, ie_mode="fast", sweep=True, show_progress=False)
    total = since(start)
    peak = peak_rss_mb()
    out = {"model": args.model, "dims": lm.dims.as_dict(), "model_fp32_mb": fp32_mb(lm), "floor_mb": floor,
           "peak_mb": peak, "working_set_mb": peak - floor, "total": total, "timings": result.timings,
           "evaluation": result.evaluation, "top_heads": result.top_heads,
           "edit_layer": result.settings["edit_layer"], "n_trials": result.indirect_effect.shape[0]}
    if args.save:
        from fvkit.method.function_vector import select_top_heads

        torch.save({"fv": result.function_vector, "ie": result.indirect_effect,
                    "mean": result.mean_activations}, Path(args.save) / "fvkit.pt")
        out["trial0_top_heads"] = [h[:2] for h in select_top_heads(result.indirect_effect[:1], N_TOP_HEADS)]
        out["ranks"] = {"zero_shot": result.zero_shot, "shuffled": result.shuffled, "baseline": result.baseline}
    return out


# --- reference ----------------------------------------------------------------------------

def reference_worker(args) -> dict:
    import torch

    from parity_tests.reference import load_reference, reference_model_config
    from fvkit.method.function_vector import select_top_heads

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    lm = load(args.model)
    ds, trials = load_task(args.dataset)
    saved = torch.load(Path(args.save) / "fvkit.pt")
    refs = load_reference(args.reference_src, args.baukit)
    cfg = reference_model_config(lm).model_config
    edit_layer, k = args.edit_layer, args.reference_items
    common = dict(model=lm.model, model_config=cfg, tokenizer=lm.tokenizer)
    out = {"items": k, "ie_trials": args.reference_ie_trials}
    with tempfile.TemporaryDirectory(prefix="fvkit-bench-ref-") as root:
        (Path(root) / "abstractive").mkdir()
        (Path(root) / "abstractive" / f"{ds.name}.json").symlink_to(Path(ds.path).resolve())
        seed = int(trials.seed)
        rds = refs.prompt_utils.load_dataset(ds.name, root_data_dir=root, test_size=float(trials.test_size), seed=seed)
        refs.model_utils.set_seed(seed)
        start = clock()
        mean = refs.extract_utils.get_mean_head_activations(rds, **common, n_icl_examples=int(trials.n_shots),
                                                            N_TRIALS=int(trials.n_trials))
        out["mean_activations"] = since(start)
        refs.model_utils.set_seed(seed)
        start = clock()
        ie = refs.compute_indirect_effect.compute_indirect_effect(
            rds, mean, **common, n_shots=int(trials.n_shots), n_trials=args.reference_ie_trials, last_token_only=True)
        out["indirect_effect"] = since(start)
        ie = torch.as_tensor(ie).float()
        out["trial0_top_heads"] = [h[:2] for h in select_top_heads(ie[:1], N_TOP_HEADS)]
        from fvkit.fast.indirect_effect import relative_drift
        out["trial0_drift_vs_fvkit"] = relative_drift(saved["ie"][:1], ie[:1])
        test = rds["test"].raw_data.iloc[:k]
        subset = dict(rds)
        subset["test"] = refs.prompt_utils.ICLDataset({"input": list(test["input"]), "output": list(test["output"])})
        fv = saved["fv"]
        for stage, shots, extra in (("zero_shot", 0, {}), ("shuffled", int(trials.n_shots), {"shuffle_labels": True})):
            refs.model_utils.set_seed(seed)
            start = clock()
            res = refs.eval_utils.n_shot_eval(dataset=subset, fv_vector=fv, edit_layer=edit_layer, n_shots=shots,
                                              **common, **extra)
            out[stage] = {**since(start), "clean_rank_list": [int(r) for r in res["clean_rank_list"]],
                          "intervention_rank_list": [int(r) for r in res["intervention_rank_list"]]}
        refs.model_utils.set_seed(seed)
        start = clock()
        res = refs.eval_utils.n_shot_eval_no_intervention(subset, n_shots=int(trials.n_shots), **common)
        out["baseline"] = {**since(start), "clean_rank_list": [int(r) for r in res["clean_rank_list"]]}
    return out


# --- driver ---------------------------------------------------------------------------------

def partial_file(role: str, model: str) -> Path:
    return PARTIAL / f"{role}-{model}.json"


def child(args, role: str, model: str, extra=()) -> dict:
    if args.from_partial:
        return json.loads(partial_file(role, model).read_text())
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", role, "--model", model,
           "--dataset", args.dataset, "--threads", str(args.threads), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    print(f"== {role} ({model})", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{role} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def extrapolate(fv: dict, ref: dict, n_items: dict) -> dict:
    """The reference's whole run from its measured parts (CPU seconds)."""
    layers = fv["dims"]["n_layers"]
    per_trial = ref["indirect_effect"]["cpu_s"] / ref["ie_trials"]
    per_item = {s: ref[s]["cpu_s"] / ref["items"] for s in ("zero_shot", "shuffled", "baseline")}
    parts = {
        "mean_activations": ref["mean_activations"]["cpu_s"],
        "indirect_effect": per_trial * fv["n_trials"],
        "layer_sweep": (per_item["zero_shot"] * n_items["zero_shot"] + per_item["shuffled"] * n_items["shuffled"])
        * layers,
        "eval_baseline": per_item["baseline"] * n_items["baseline"],
    }
    return {"per_trial_ie_s": per_trial, "per_item_s": per_item, "parts": parts, "total_s": sum(parts.values())}


def agreement(fv: dict, ref: dict) -> dict:
    out = {"trial0_top_heads_equal": fv["trial0_top_heads"] == ref["trial0_top_heads"],
           "trial0_ie_drift": ref["trial0_drift_vs_fvkit"]}
    k = ref["items"]
    for stage in ("zero_shot", "shuffled", "baseline"):
        keys = ("clean_rank_list",) + (("intervention_rank_list",) if stage != "baseline" else ())
        diffs = {key: sum(a != b for a, b in zip(fv["ranks"][stage][key][:k], ref[stage][key])) for key in keys}
        out[stage] = diffs
    return out


def markdown(report: dict) -> str:
    fv, ref, ex, mem = report["fvkit"], report["reference"], report["extrapolated"], report["memory"]
    t = fv["timings"]
    fv_cpu = fv["total"]["cpu_s"]
    ie_fv = t["indirect_effect"] / fv["n_trials"]
    lines = [
        "# Whole run: fvkit vs the reference", "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; torch {report['machine']['torch']}, "
        f"transformers {report['machine']['transformers']}, Python {report['machine']['python']}; 1 torch thread; "
        f"load average {report['machine']['load_average'][0]} at start, {report['load_average_end']} at end. fp32, CPU.",
        "",
        f"Model {fv['model']} ({fv['dims']['n_layers']} layers x {fv['dims']['n_heads']} heads), task {report['dataset']} "
        f"(its fixed trials: {fv['n_trials']} trials, {report['n_items']['zero_shot']} test items per evaluation), "
        f"{N_TOP_HEADS} top heads, edit layer {fv['edit_layer']}, layer sweep over all {fv['dims']['n_layers']} layers. "
        f"The reference ran {ref['ie_trials']} indirect-effect trial(s) and its evaluations on the first "
        f"{ref['items']} test items, in the same invocation; its whole run is extrapolated from those (CPU seconds).",
        "",
        "| stage | reference (CPU s, extrapolated) | fvkit (CPU s) | speed-up |",
        "|---|---|---|---|",
    ]
    fv_parts = {"mean_activations": t["mean_activations"], "indirect_effect": t["indirect_effect"],
                "layer_sweep": t.get("layer_sweep", 0.0), "eval_baseline": t["eval_baseline"]}
    for name, ref_s in ex["parts"].items():
        lines.append(f"| {name} | {ref_s:.1f} | {fv_parts[name]:.1f} | {ref_s / max(fv_parts[name], 1e-9):.1f}x |")
    lines += [
        f"| **whole run** | **{ex['total_s']:.0f}** | **{fv_cpu:.1f}** (wall {fv['total']['wall_s']:.1f}) | "
        f"**{ex['total_s'] / fv_cpu:.1f}x** (target {RUN_SPEEDUP_TARGET}x) |",
        f"| indirect effect per trial | {ex['per_trial_ie_s']:.1f} | {ie_fv:.2f} | "
        f"**{ex['per_trial_ie_s'] / ie_fv:.1f}x** (target {IE_SPEEDUP_TARGET}x) |",
        "",
        "All times are CPU seconds of one-thread processes (a shared machine's other load inflates wall clock, "
        "not these).", "",
        "Agreement:", "",
        f"- top heads of the first trial, fvkit fast vs the reference: "
        f"{'identical' if report['agreement']['trial0_top_heads_equal'] else 'DIFFERENT'}; largest effect drift "
        f"{report['agreement']['trial0_ie_drift']:.2e} of the largest effect",
    ]
    for stage in ("zero_shot", "shuffled", "baseline"):
        d = report["agreement"][stage]
        lines.append(f"- {stage}: rank differences on the {ref['items']} items: "
                     + ", ".join(f"{k} {v}" for k, v in d.items()))
    ev = fv["evaluation"]
    lines += [f"- near ties in fvkit's cached evaluation (each re-run from the edited block on, as the "
              f"whole-prompt pass computes it): zero-shot "
              f"{ev.get('zero_shot_near_ties')}, shuffled {ev.get('shuffled_near_ties')} of "
              f"{report['n_items']['zero_shot'] * fv['dims']['n_layers']} item-layers each; clean few-shot with the "
              f"vector {ev['baseline'].get('near_ties')} of {report['n_items']['baseline']}", "",
              "## Working set", "",
              "Peak resident memory during the run above the runtime floor (the process after the model has run "
              "one prompt: Python, torch, transformers, tokenizer and weights resident).", "",
              "| model | fp32 size MB | floor MB | peak MB | working set MB | x fp32 | at most 0.3x |",
              "|---|---|---|---|---|---|---|"]
    for m in (fv, mem):
        ratio = m["working_set_mb"] / m["model_fp32_mb"]
        lines.append(f"| {m['model']} | {m['model_fp32_mb']:.0f} | {m['floor_mb']:.0f} | {m['peak_mb']:.0f} | "
                     f"{m['working_set_mb']:.0f} | {ratio:.2f} | {'yes' if ratio <= WORKING_SET_FRACTION else 'no'} |")
    lines += ["", f"fvkit stage times (s): {json.dumps(fv['timings'])}; memory model's: {json.dumps(mem['timings'])}"]
    return "\n".join(lines) + "\n"


def driver(args) -> int:
    from fvkit.method.data import atomic_write_text

    report = {"machine": machine(), "dataset": args.dataset}
    with tempfile.TemporaryDirectory(prefix="fvkit-bench-run-") as tmp:
        tmp = str(PARTIAL) if args.from_partial else tmp
        fv = child(args, "fvkit", args.model, ["--save", tmp])
        ref = child(args, "reference", args.model,
                    ["--save", tmp, "--reference-src", args.reference_src, "--baukit", args.baukit,
                     "--edit-layer", str(fv["edit_layer"]), "--reference-items", str(args.reference_items),
                     "--reference-ie-trials", str(args.reference_ie_trials)])
    mem = child(args, "fvkit", args.memory_model)
    ds, trials = load_task(args.dataset)
    report.update(fvkit=fv, reference=ref, memory=mem,
                  n_items={s: trials.n_items(s) for s in ("zero_shot", "shuffled", "baseline")})
    report["extrapolated"] = extrapolate(fv, ref, report["n_items"])
    report["agreement"] = agreement(fv, ref)
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    text = markdown(report)
    out = Path(args.out_dir)
    atomic_write_text(out / "whole_run.md", text)
    atomic_write_text(out / "whole_run.json", json.dumps(report, indent=1, default=str) + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference-src", default=os.environ.get("FVKIT_REFERENCE_SRC"))
    p.add_argument("--baukit", default=os.environ.get("FVKIT_BAUKIT"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--memory-model", default="gpt2-small-shaped")
    p.add_argument("--dataset", default="present-past")
    p.add_argument("--reference-ie-trials", type=int, default=1)
    p.add_argument("--reference-items", type=int, default=10, help="test items of each reference evaluation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--from-partial", action="store_true",
                   help=f"build the report from the children's results left in {PARTIAL}")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    p.add_argument("--edit-layer", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker in ("fvkit", "reference"):
        result = json.dumps((fvkit_worker if args.worker == "fvkit" else reference_worker)(args), default=str)
        PARTIAL.mkdir(parents=True, exist_ok=True)
        partial_file(args.worker, args.model).write_text(result + "\n")
        if args.save and args.worker == "fvkit":
            import shutil
            shutil.copy(Path(args.save) / "fvkit.pt", PARTIAL / "fvkit.pt")
        print(result)
        return 0
    if not (args.reference_src and args.baukit):
        p.error("--reference-src and --baukit are needed (or FVKIT_REFERENCE_SRC / FVKIT_BAUKIT)")
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
