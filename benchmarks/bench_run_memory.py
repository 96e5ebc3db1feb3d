"""Peak memory of a whole ``fvkit run`` on a GPT-2-small-shaped model, against its fp32 size.

    python benchmarks/bench_run_memory.py \\
        --reference-src /path/to/function_vectors --baukit /path/to/baukit \\
        --python .tox/tf449/bin/python --python .tox/tfnew/bin/python

The acceptance criterion: the peak resident memory of the ``fvkit run``
process stays under twice the model's fp32 parameter size. The model is the one
``bench_indirect_effect.py`` builds (GPT-2 architecture, 12 layers x 12 heads,
hidden 768, vocabulary 50257, deterministic random weights, ~475 MB in fp32),
written with ``save_pretrained`` (safetensors) and the GPT-2 tokenizer into a
temporary directory, and loaded from there as any local checkpoint is.

Every measured program is a child process of its own; its peak is the
``ru_maxrss`` that ``os.wait4`` reports for exactly that child:

* ``fvkit run``: ``python -m fvkit.cli.main run --model DIR --dataset antonym
  --out OUT`` with the defaults (10 trials, ``ie_mode`` fast, edit layer
  n_layers // 2, the repository's ``datasets/``), uninstrumented. Its peak is
  the headline number.
* breakdown: the same command once more inside a small wrapper that marks the
  start and end of each step (imports, ``from_pretrained``, tokenizer, each
  pipeline stage, figures, writing). At every mark it records the resident set
  (anonymous and file-backed parts) and the high-water mark since the previous
  mark, then restarts the high-water mark (``/proc/self/clear_refs``), so the
  peak is attributed to the interval where it happened.
* reference (with ``--reference-src`` and ``--baukit``): the paper's code on
  the same directory, loaded as its ``load_gpt_model_and_tokenizer`` loads GPT-2
  (``AutoModelForCausalLM.from_pretrained(path).to(device)``), then its
  ``get_mean_head_activations`` over the same 10 trials and one trial of its
  ``compute_indirect_effect`` (one trial takes about a minute; more add time,
  not memory), with the same marks.

Each ``--python`` interpreter (default: the one running this script) gets all
of these, with the model written by its own transformers release.

Results go to ``benchmarks/results/run_memory.md`` and ``run_memory.json``.
This is not part of the test suite, and it asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as a script (also in its child processes), so this folder is on sys.path; the
# module imports nothing but the standard library at the top.
from bench_indirect_effect import GPT2_SMALL_SEED, _status_kb, gpt2_small_shaped, reset_peak_rss
from bench_indirect_effect import machine as describe_machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATASET = "antonym"
DATASET_FILE = REPO / "datasets" / f"{DATASET}.json"
#: The criterion: peak RSS below this multiple of the fp32 parameter size.
CRITERION_RATIO = 2.0
MB = 2**20


# --- Marks (used inside the measured child processes) ------------------------------------

_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def _status() -> dict:
    """Resident-set fields of /proc/self/status in MB (Linux); None where absent."""
    kbs = {name: _status_kb(name) for name in _STATUS_FIELDS}
    return {name: kb / 1024 if kb >= 0 else None for name, kb in kbs.items()}


class Marks:
    """Resident memory at named points, and the peak of each interval between them.

        marks = Marks()
        marks.mark("imports")           # RSS now, peak since the previous mark
        marks.wrap(module, "function")  # marks at its start and end
    """

    def __init__(self):
        self.events = []
        self.start = time.perf_counter()
        self.can_reset = reset_peak_rss()
        self.mark("interpreter started")

    def mark(self, label: str) -> None:
        s = _status()
        self.events.append({"point": label, "t_s": round(time.perf_counter() - self.start, 3),
                            "rss_mb": s["VmRSS"], "anon_mb": s["RssAnon"], "file_mb": s["RssFile"],
                            "peak_since_previous_mb": s["VmHWM"]})
        reset_peak_rss()

    def wrap(self, owner, name: str, label=None, start_label=None) -> None:
        """Mark the start and end of every call of ``owner.name`` (a function or classmethod).

        ``label`` is a string or a function of the call's arguments; leading spaces
        nest the step under the one before it in the report.
        """
        original = getattr(owner, name)
        is_classmethod = isinstance(owner, type) and isinstance(owner.__dict__.get(name), classmethod)

        def marked(*args, **kwargs):
            text = label(*args, **kwargs) if callable(label) else (label or name)
            self.mark(start_label or f"{text}: start")
            try:
                return original(*args, **kwargs)
            finally:
                self.mark(f"{text}: end")

        if is_classmethod:
            setattr(owner, name, classmethod(lambda cls, *a, **k: marked(*a, **k)))
        else:
            setattr(owner, name, marked)

    def dump(self, path: str, extra: dict) -> None:
        Path(path).write_text(json.dumps({"events": self.events, "hwm_reset": self.can_reset, **extra}, indent=1))


def child_fvkit_run(args) -> int:
    """``fvkit run`` with marks around its steps (see module docstring)."""
    marks = Marks()
    import torch  # noqa: F401  (imported by the run anyway; marked separately)
    import transformers

    import fvkit.cli.main
    from fvkit.models import loader as hf_loader, zoo
    from fvkit import pipeline as run

    marks.mark("imports (torch, transformers, fvkit.cli.main)")
    # fvkit.report.run_files (and matplotlib with it) is left for `fvkit run` to import when it
    # wants to: its figures step is the interval between run_pipeline's end and write_run_outputs.
    marks.wrap(hf_loader, "load_model", "load_model")
    marks.wrap(transformers.AutoModelForCausalLM, "from_pretrained", "  from_pretrained (model)")
    marks.wrap(transformers.AutoTokenizer, "from_pretrained", "  from_pretrained (tokenizer)")
    marks.wrap(hf_loader, "resolve_all_layers", "  resolve_all_layers")
    marks.wrap(zoo, "weights_sha256", "  weights_sha256")
    marks.wrap(run, "run_pipeline", "run_pipeline")
    marks.wrap(run, "mean_head_activations", "  mean_activations")
    marks.wrap(run, "indirect_effects", "  indirect_effect")
    marks.wrap(run, "compute_function_vector", "  function_vector")
    marks.wrap(run, "evaluate", lambda lm, dataset, trials, stage, *a, **k: f"  eval_{stage}")
    marks.wrap(run, "evaluate_baseline", "  eval_baseline")
    marks.wrap(run, "write_run_outputs", "write_run_outputs",
               start_label="run_artifacts done (figures, decoded tokens, report.html); write_run_outputs: start")
    status = fvkit.cli.main.main(["run", *args.fvkit_args])
    marks.mark("exit")
    marks.dump(args.marks_out, {"status": status})
    return status


def child_reference(args) -> int:
    """The reference's loading, mean activations and indirect effect on the same directory."""
    marks = Marks()
    import inspect
    import types

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(REPO))
    from fvkit.models.config import dims_from_config
    from fvkit.models.spec import get_spec
    from parity_tests.reference import load_reference, reference_model_config

    refs = load_reference(args.reference_src, args.baukit)
    marks.mark("imports (torch, transformers, reference, baukit)")
    torch.set_grad_enabled(False)
    # The reference's load_gpt_model_and_tokenizer, GPT-2 branch, on a local directory.
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    marks.mark("tokenizer loaded")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).to("cpu")
    marks.mark("model loaded (from_pretrained(path).to(device))")
    config = AutoConfig.from_pretrained(args.model_dir)
    spec = get_spec("gpt2")
    lm = types.SimpleNamespace(model=model, spec=spec, dims=dims_from_config(config, spec), tokenizer=tokenizer)
    model_config = reference_model_config(lm).model_config
    pu, eu = refs.prompt_utils, refs.extract_utils
    template = inspect.signature(pu.word_pairs_to_prompt_data).parameters
    prefixes, separators = template["prefixes"].default, template["separators"].default
    common = dict(model=model, model_config=model_config, tokenizer=tokenizer)
    with tempfile.TemporaryDirectory(prefix="fvkit-bench-ref-") as root:
        (Path(root) / "abstractive").mkdir()
        (Path(root) / "abstractive" / DATASET_FILE.name).symlink_to(DATASET_FILE)
        refs.model_utils.set_seed(args.seed)
        ds = pu.load_dataset(DATASET, root_data_dir=root, test_size=0.3, seed=args.seed)
    marks.mark("mean_activations: start")
    refs.model_utils.set_seed(args.seed)
    mean = eu.get_mean_head_activations(ds, **common, n_icl_examples=10, N_TRIALS=args.ma_trials,
                                        prefixes=prefixes, separators=separators, filter_set=None)
    marks.mark("mean_activations: end")
    marks.mark("indirect_effect: start")
    refs.model_utils.set_seed(args.seed)
    refs.compute_indirect_effect.compute_indirect_effect(
        ds, mean, **common, n_shots=10, n_trials=args.ie_trials, last_token_only=True,
        prefixes=prefixes, separators=separators, filter_set=None)
    marks.mark("indirect_effect: end")
    marks.mark("exit")
    marks.dump(args.marks_out, {"status": 0, "ma_trials": args.ma_trials, "ie_trials": args.ie_trials,
                                "loader_call": "AutoModelForCausalLM.from_pretrained(path).to('cpu')"})
    return 0


def child_export(args) -> int:
    """Write the GPT-2-small-shaped model and its tokenizer to ``args.export`` (safetensors)."""
    from fvkit.models.tokenizers import save_tokenizer

    lm = gpt2_small_shaped()
    lm.model.save_pretrained(args.export, safe_serialization=True)
    save_tokenizer(lm.tokenizer, args.export, add_bos_token=False)
    params = {id(p): p.numel() for p in lm.model.parameters()}  # tied embeddings once
    import torch
    import transformers

    print(json.dumps({"fp32_mb": sum(params.values()) * 4 / MB, "parameters": sum(params.values()),
                      "seed": GPT2_SMALL_SEED, "dims": lm.dims.as_dict(),
                      "versions": {"transformers": transformers.__version__, "torch": torch.__version__}}))
    return 0


# --- Driver --------------------------------------------------------------------------------

def run_child(cmd: list, env: dict, log: Path) -> dict:
    """Run ``cmd``; its exit status, wall time and peak RSS (its own ru_maxrss, via wait4)."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": usage.ru_maxrss / 1024,
            "log_tail": log.read_text()[-2000:]}


def machine() -> dict:
    info = describe_machine()
    try:
        kb = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE).group(1)
        info["memory_gb"] = round(int(kb) / 2**20, 1)
    except (OSError, AttributeError):
        pass
    return info


def peak_interval(events: list) -> dict:
    """The interval (between two marks) whose high-water mark is the largest."""
    best = max(range(1, len(events)), key=lambda i: events[i]["peak_since_previous_mb"])
    return {"from": events[best - 1]["point"], "to": events[best]["point"],
            "peak_mb": events[best]["peak_since_previous_mb"], "index": best}


def with_marks(res: dict, marks_file: Path) -> dict:
    """``res`` with the marks of its run, and its peak taken from them.

    Restarting the high-water mark also lowers what the kernel reports as the
    process's ``ru_maxrss`` (it keeps the high-water mark at exit), so the peak of
    a marked run is the largest interval peak (or ru_maxrss, if that is larger).
    """
    if res["returncode"] != 0 or not marks_file.is_file():
        return res
    res.update(json.loads(marks_file.read_text()))
    res["ru_maxrss_mb"] = res["peak_rss_mb"]
    res["peak_interval"] = peak_interval(res["events"])
    res["peak_rss_mb"] = max(res["peak_rss_mb"], res["peak_interval"]["peak_mb"])
    return res


def stages_peak(events: list, last_point: str) -> float:
    """Largest high-water mark from the start up to and including the mark ``last_point``."""
    peak = 0.0
    for e in events:
        peak = max(peak, e["peak_since_previous_mb"])
        if e["point"] == last_point:
            break
    return peak


def measure_environment(python: str, args, env: dict, tmp: Path, me: str) -> dict:
    """Every measurement with one interpreter (one transformers line)."""
    out = {"python": python}
    model_dir = tmp / "gpt2-small-shaped"
    print(f"== [{python}] exporting the GPT-2-small-shaped model", file=sys.stderr, flush=True)
    exp = run_child([python, me, "--export", str(model_dir)], env, tmp / "export.log")
    if exp["returncode"] != 0:
        return {**out, "error": f"export failed: {exp['log_tail']}"}
    info = json.loads(exp["log_tail"].strip().splitlines()[-1])
    out["versions"] = info.pop("versions")
    out["model"] = {"name": "gpt2-small-shaped", **info,
                    "safetensors_mb": (model_dir / "model.safetensors").stat().st_size / MB}
    fp32 = out["model"]["fp32_mb"]
    fvkit_args = ["--model", str(model_dir), "--dataset", DATASET]
    if args.max_trials:
        fvkit_args += ["--max-trials", str(args.max_trials)]
    out["fvkit_args"] = ["fvkit", "run", "--model", "<dir>", *fvkit_args[2:], "--out", "<dir>"]

    print(f"== [{python}] fvkit run", file=sys.stderr, flush=True)
    plain = run_child([python, "-m", "fvkit.cli.main", "run", *fvkit_args, "--out", str(tmp / "run-plain")],
                      env, tmp / "run-plain.log")
    if plain["returncode"] != 0:
        return {**out, "error": f"fvkit run failed: {plain['log_tail']}"}
    plain["timings"] = json.loads((tmp / "run-plain" / "timings.json").read_text())
    plain["settings"] = json.loads((tmp / "run-plain" / "run.json").read_text())["settings"]
    plain["ratio"] = plain["peak_rss_mb"] / fp32
    out["fvkit_run"] = plain

    if args.breakdown:
        print(f"== [{python}] fvkit run with marks", file=sys.stderr, flush=True)
        marks_file = tmp / "marks-fvkit.json"
        res = run_child([python, me, "--child-run", "--marks-out", str(marks_file), "--",
                         *fvkit_args, "--out", str(tmp / "run-marked")], env, tmp / "run-marked.log")
        res = with_marks(res, marks_file)
        if "events" in res:
            res["ratio"] = res["peak_rss_mb"] / fp32
            res["peak_through_indirect_effect_mb"] = stages_peak(res["events"], "  indirect_effect: end")
        out["fvkit_run_breakdown"] = res

    if args.reference_src and args.baukit:
        print(f"== [{python}] reference", file=sys.stderr, flush=True)
        marks_file = tmp / "marks-reference.json"
        res = run_child([python, me, "--child-reference", "--marks-out", str(marks_file),
                         "--model-dir", str(model_dir), "--reference-src", args.reference_src,
                         "--baukit", args.baukit, "--ie-trials", str(args.reference_ie_trials),
                         "--ma-trials", str(args.max_trials or 10)], env, tmp / "reference.log")
        res = with_marks(res, marks_file)
        if "events" in res:
            res["ratio"] = res["peak_rss_mb"] / fp32
        out["reference"] = res
    return out


def driver(args) -> int:
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_DISABLE": "1",
           "FVKIT_PROGRESS": "0", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    me = str(Path(__file__).resolve())
    report = {"machine": machine(), "threads": args.threads, "criterion_ratio": CRITERION_RATIO,
              "reference_ie_trials": args.reference_ie_trials, "environments": []}
    for python in args.python or [sys.executable]:
        with tempfile.TemporaryDirectory(prefix="fvkit-bench-mem-") as tmp:
            report["environments"].append(measure_environment(python, args, env, Path(tmp), me))
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    text = markdown(report)
    out_dir = Path(args.out_dir)
    from fvkit.method.data import atomic_write_text as write_atomic

    write_atomic(out_dir / "run_memory.md", text)
    write_atomic(out_dir / "run_memory.json", json.dumps(report, indent=1) + "\n")
    print(text)
    return 0 if all("error" not in e for e in report["environments"]) else 1


# --- Report --------------------------------------------------------------------------------

def _events_table(w, events: list, peak_index: int) -> None:
    w("| point | t s | RSS MB | anonymous MB | file-backed MB | peak since previous point MB |")
    w("|---|---|---|---|---|---|")
    for i, e in enumerate(events):
        peak = f"{e['peak_since_previous_mb']:.0f}"
        if i == peak_index:
            peak = f"**{peak} (peak)**"
        point = e["point"].strip()
        if e["point"].startswith("  "):
            point = "&nbsp;&nbsp;&nbsp;&nbsp;" + point  # a step inside the one marked before it
        w(f"| {point} | {e['t_s']:.1f} | {e['rss_mb']:.0f} | {e['anon_mb']:.0f} | {e['file_mb']:.0f} | "
          f"{peak if i else '-'} |")


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def _x(value, fp32) -> str:
    return "-" if value is None else f"{value / fp32:.2f}"


def markdown(report: dict) -> str:
    m = report["machine"]
    envs = [e for e in report["environments"] if "fvkit_run" in e]
    out = io.StringIO()
    w = lambda line="": out.write(line + "\n")  # noqa: E731
    w("# Peak memory of `fvkit run`")
    w()
    w(f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gb', '?')} GB; Python {m['python']}; "
      f"{report['threads']} torch thread(s) (OMP_NUM_THREADS) in every measured process; load average at start "
      f"{m['load_average'][0]}, at end {report['load_average_end']}. fp32, CPU. Generated by "
      f"`benchmarks/bench_run_memory.py`.")
    w()
    if envs:
        model = envs[0]["model"]
        fp32 = model["fp32_mb"]
        d = model["dims"]
        w(f"Model: GPT-2-small-shaped ({d['n_layers']} layers x {d['n_heads']} heads, hidden {d['hidden_size']}, "
          f"vocabulary {d['vocab_size']}, random weights from `fvkit.models.zoo.initialise`, seed `{model['seed']}`), "
          f"{model['parameters']:,} parameters = **{fp32:.0f} MB in fp32**; written with `save_pretrained` "
          f"({model['safetensors_mb']:.0f} MB safetensors) into a temporary directory and loaded from there. "
          f"Criterion: peak RSS of the whole `fvkit run` process < {CRITERION_RATIO:g} x {fp32:.0f} = "
          f"{CRITERION_RATIO * fp32:.0f} MB.")
        w()
        w(f"`{' '.join(envs[0]['fvkit_args'])}`: {envs[0]['fvkit_run']['settings']['n_trials_used']} trials, "
          f"ie_mode {envs[0]['fvkit_run']['settings']['ie_mode']}, edit layer "
          f"{envs[0]['fvkit_run']['settings']['edit_layer']}, the repository's `datasets/`. The reference runs its "
          f"own GPT-2 loading call, its `get_mean_head_activations` over the same trials and "
          f"{report.get('reference_ie_trials', 1)} trial of its `compute_indirect_effect`; the fvkit column next to "
          f"it is the marked run's peak over the same steps (loading, mean activations, indirect effect).")
        w()
        w("| transformers | torch | `fvkit run` peak MB | x fp32 | under 2x | reference peak MB | x fp32 | "
          "fvkit, same steps MB | fvkit / reference, same steps | whole `fvkit run` / reference |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for e in envs:
            run, ref = e.get("fvkit_run", {}), e.get("reference") or {}
            bd = e.get("fvkit_run_breakdown") or {}
            fp32 = e["model"]["fp32_mb"]
            ref_peak = ref.get("peak_rss_mb") if "events" in ref else None
            same = bd.get("peak_through_indirect_effect_mb")
            same_ratio = f"{same / ref_peak:.2f}" if same and ref_peak else "-"
            whole_ratio = f"{run['peak_rss_mb'] / ref_peak:.2f}" if ref_peak else "-"
            w(f"| {e['versions']['transformers']} | {e['versions']['torch']} | **{_mb(run['peak_rss_mb'])}** | "
              f"**{_x(run['peak_rss_mb'], fp32)}** | {'yes' if run['ratio'] < CRITERION_RATIO else 'no'} | "
              f"{_mb(ref_peak)} | {_x(ref_peak, fp32)} | {_mb(same)} | {same_ratio} | {whole_ratio} |")
    for e in report["environments"]:
        w()
        if "error" in e:
            w(f"## {e['python']}: failed")
            w()
            w(f"```\n{e['error'][-1500:]}\n```")
            continue
        _environment_section(w, e)
    return out.getvalue()


def _environment_section(w, e: dict) -> None:
    fp32 = e["model"]["fp32_mb"]
    run = e["fvkit_run"]
    w(f"## transformers {e['versions']['transformers']}")
    w()
    w(f"`fvkit run` (uninstrumented; its `ru_maxrss`): peak **{run['peak_rss_mb']:.0f} MB = {run['ratio']:.2f} x** "
      f"the fp32 size; wall {run['wall_s']:.0f} s, CPU {run['cpu_s']:.0f} s. Stage times (timings.json): "
      + ", ".join(f"{k} {v:.1f} s" for k, v in run["timings"].items()) + ".")
    bd = e.get("fvkit_run_breakdown")
    if bd and "events" in bd:
        pk = bd["peak_interval"]
        w()
        w(f"Where the peak happens: the same command in a wrapper that marks each step. At each point: the resident "
          f"set, split into anonymous memory (tensors, Python objects, allocator caches) and file-backed pages "
          f"(shared libraries and the memory-mapped checkpoint, whose pages count once touched), and the "
          f"high-water mark since the previous point (restarted at every point). This run peaked at "
          f"**{bd['peak_rss_mb']:.0f} MB**, between \"{pk['from'].strip()}\" and \"{pk['to'].strip()}\".")
        w()
        _events_table(w, bd["events"], pk["index"])
        loaded = next((x for x in bd["events"] if x["point"] == "load_model: end"), None)
        if loaded:
            floor = loaded["rss_mb"] + fp32
            w()
            w(f"Floor: when `load_model` returns, the process holds {loaded['rss_mb']:.0f} MB (Python, torch, "
              f"transformers, the tokenizer, the model's structure; the checkpoint is mapped but not yet read), and "
              f"the weights' {fp32:.0f} MB become resident as the first passes read them: {floor:.0f} MB = "
              f"{floor / fp32:.2f} x the fp32 size before any stage holds a tensor of its own.")
    elif bd:
        w()
        w(f"The marked run failed:\n\n```\n{bd.get('log_tail', '')[-1500:]}\n```")
    ref = e.get("reference")
    if ref and "events" in ref:
        pk = ref["peak_interval"]
        w()
        w(f"Reference (`{ref['loader_call']}`, `get_mean_head_activations` over {ref['ma_trials']} trials, "
          f"{ref['ie_trials']} trial(s) of `compute_indirect_effect`): peak **{ref['peak_rss_mb']:.0f} MB = "
          f"{ref['ratio']:.2f} x**, between \"{pk['from']}\" and \"{pk['to']}\"; wall {ref['wall_s']:.0f} s.")
        w()
        _events_table(w, ref["events"], pk["index"])
    elif ref:
        w()
        w(f"The reference run failed:\n\n```\n{ref.get('log_tail', '')[-1500:]}\n```")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference-src", default=os.environ.get("FVKIT_REFERENCE_SRC"),
                   help="checkout of the reference (its folder or its src/); default $FVKIT_REFERENCE_SRC")
    p.add_argument("--baukit", default=os.environ.get("FVKIT_BAUKIT"), help="baukit checkout; default $FVKIT_BAUKIT")
    p.add_argument("--max-trials", type=int, default=None, help="--max-trials of the measured run (default: all 10)")
    p.add_argument("--reference-ie-trials", type=int, default=1, help="indirect-effect trials of the reference")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every measured process")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="skip the second, marked `fvkit run` that attributes the peak to a step")
    p.add_argument("--python", action="append", default=None, metavar="INTERPRETER",
                   help="measure with this Python (another environment, e.g. another transformers release); "
                        "repeatable; default: the one running this script")
    p.add_argument("--out-dir", default=str(RESULTS))
    # Child modes (internal).
    p.add_argument("--export", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-run", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-reference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--marks-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ma-trials", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--ie-trials", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("fvkit_args", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--render", action="store_true",
                   help="only rewrite run_memory.md in --out-dir from the run_memory.json there")
    args = p.parse_args(argv)
    if args.render:
        from fvkit.method.data import atomic_write_text as write_atomic

        out_dir = Path(args.out_dir)
        write_atomic(out_dir / "run_memory.md", markdown(json.loads((out_dir / "run_memory.json").read_text())))
        return 0
    if args.export:
        return child_export(args)
    if args.child_run:
        return child_fvkit_run(args)
    if args.child_reference:
        return child_reference(args)
    if bool(args.reference_src) != bool(args.baukit):
        p.error("--reference-src and --baukit go together")
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
