"""The figures, decoded tokens, optional layer sweep and HTML page of one ``fvkit run``.

    result = run_pipeline(lm, ds, trials)
    files = run_artifacts(lm, ds, trials, result, sweep=True)   # {"cie_heatmap.png": b"...", ...}
    write_run_outputs(result, out_dir, extra_files=files)

Everything is returned as file name -> bytes so that the run directory is still
written in one atomic step. The sweep's time is added to ``result.timings``.
"""

from __future__ import annotations

from fvkit.report.figures import cie_heatmap, layer_sweep_plot
from fvkit.report.page import render_html
from fvkit.fast.sweep import layer_sweep
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.models.zoo import is_trained
from fvkit.pipeline import ARTIFACT_FILES, SWEEP_FILES, block_written_summary, json_text, package_versions
from fvkit.report.vocab import decode_vector

#: Tokens of the decoded function vector that are written and shown.
DECODE_TOP_K = 10
#: File names a run adds next to its stage files (ARTIFACT_FILES; SWEEP_FILES only with
#: --edit-layer all) are listed in fvkit.pipeline, which checks a run directory before any work.


def run_caption(result, dataset_name: str) -> str:
    """The caption under every figure of a run: model, task, trials, settings."""
    s = result.settings
    return (f"model {result.model} (spec {result.spec}); task {dataset_name}; trials {result.trials_id}: "
            f"{s.get('n_trials_used')} trials of {s.get('n_shots')} shots, seed {s.get('seed')}; "
            f"indirect effect mode {s.get('ie_mode')}; {len(result.top_heads)} top heads.")


def _json_bytes(obj) -> bytes:
    return json_text(obj).encode("utf-8")


def _top1(evaluation: dict, key: str):
    return evaluation[key][0][1]


def accuracy_metrics(zero_shot: dict, shuffled: dict, baseline: dict, n_shots, layer) -> dict:
    """Top-1 accuracies by label; the same labels serve fvkit's numbers and the reference's."""
    return {
        f"clean {n_shots}-shot top-1": _top1(baseline, "clean_topk"),
        "zero-shot top-1, no vector": _top1(zero_shot, "clean_topk"),
        f"zero-shot top-1, vector at layer {layer}": _top1(zero_shot, "intervention_topk"),
        "shuffled-label top-1, no vector": _top1(shuffled, "clean_topk"),
        f"shuffled-label top-1, vector at layer {layer}": _top1(shuffled, "intervention_topk"),
    }


def sweep_ties(sweep: dict, stage: str) -> bool:
    """True when every layer gives the same top-1 accuracy: then no layer is the best one."""
    return len({t[0][1] for t in sweep["stages"][stage]["intervention_topk"]}) == 1


def run_metrics(result, sweep=None) -> dict:
    """The headline numbers of a run, for the page and the terminal."""
    out = accuracy_metrics(result.zero_shot, result.shuffled, result.baseline, result.settings.get("n_shots"),
                           result.settings.get("edit_layer"))
    if sweep:
        for stage, label in (("zero_shot", "zero-shot"), ("shuffled", "shuffled-label")):
            accs = sweep["stages"][stage]["intervention_topk"]
            if sweep_ties(sweep, stage):
                out[f"{label} top-1, vector at any layer (every layer ties: no best layer)"] = accs[0][0][1]
                continue
            best = sweep["best_layer"][stage]
            out[f"{label} top-1, vector at its best layer ({best})"] = accs[best][0][1]
    return out


def reference_metrics(reference: dict, settings: dict) -> dict:
    """The reference's accuracies under :func:`run_metrics`' labels (its M4 result: live or stored)."""
    if not reference or not all(reference.get(k) for k in ("zero_shot", "shuffled", "baseline")):
        return {}
    return accuracy_metrics(reference["zero_shot"], reference["shuffled"], reference["baseline"],
                            settings.get("n_shots"), settings.get("edit_layer"))


def head_effects(result) -> list:
    """``[layer, head, listed score, mean indirect effect]`` of each top head; the last unrounded,
    so a random model's effects of 1e-9 show as such rather than as the list's 0.0."""
    mean = result.indirect_effect.mean(dim=0)
    return [[int(h[0]), int(h[1]), h[2], float(mean[int(h[0]), int(h[1])])] for h in result.top_heads]


def report_entry(result, dataset_name: str, lm=None, sweep=None, reference=None) -> dict:
    """One model's entry of :func:`fvkit.report.page.render_html`'s ``models`` argument.

        models = {r.model: report_entry(r, "antonym", lm) for r, lm in runs}
        write_html_report("results_fv/antonym/<trials_id>/parity_suite_report.json", models)

    Without ``lm`` the vector is not decoded; without ``sweep`` there is no sweep figure;
    ``reference`` (the reference's M4 result: top heads and evaluations) puts its numbers
    beside fvkit's.
    """
    caption = run_caption(result, dataset_name)
    heatmap = cie_heatmap(result.indirect_effect.mean(dim=0), result.top_heads,
                          title=f"Mean indirect effect per head: {result.model} on {dataset_name}", caption=caption)
    decoded = decode_vector(lm, result.function_vector, k=DECODE_TOP_K) if lm is not None else []
    sweep_png = None
    if sweep is not None:
        sweep_png = layer_sweep_plot(
            sweep, title=f"Accuracy with the function vector at each layer: {result.model} on {dataset_name}",
            caption=caption + f" {sweep['stages']['zero_shot']['n_items']} test items per stage.",
            baseline_top1=_top1(result.baseline, "clean_topk"), n_shots=result.settings.get("n_shots"),
            edit_layer=result.settings.get("edit_layer"))
    entry = {"heatmap_png": heatmap, "sweep_png": sweep_png, "decoded": decoded, "top_heads": result.top_heads,
             "metrics": run_metrics(result, sweep), "timings": dict(result.timings),
             "trained": is_trained(result.model), "head_effects": head_effects(result)}
    scale = getattr(result, "vector_scale", None)
    if scale:
        entry["vector_scale"] = scale
        entry["warnings"] = result.scale_warnings()
    if getattr(result, "block_written", None):
        entry["block_written"] = block_written_summary(result)
    if reference:
        entry["reference"] = {"metrics": reference_metrics(reference, result.settings),
                              "top_heads": list(reference.get("top_heads") or [])}
    return entry


def run_artifacts(lm, dataset, trials, result, sweep: bool = False, template: Template = DEFAULT_TEMPLATE,
                  show_progress: bool = True) -> dict:
    files = {}
    sweep_result = None
    if sweep and getattr(result, "sweep", None) is not None:
        sweep_result = result.sweep   # computed with the run's evaluations, from the same passes
    elif sweep:
        sweep_result = layer_sweep(lm, dataset, trials, result.function_vector, template,
                                   show_progress=show_progress)
        result.timings["layer_sweep"] = sweep_result["seconds"]
    if sweep_result is not None:
        files["layer_sweep.json"] = _json_bytes(sweep_result)
    entry = report_entry(result, dataset.name, lm, sweep_result)
    files["cie_heatmap.png"] = entry["heatmap_png"]
    if entry["sweep_png"] is not None:
        files["layer_sweep.png"] = entry["sweep_png"]
    files["decoded_tokens.json"] = _json_bytes({"model": result.model, "k": DECODE_TOP_K,
                                                "tokens": [[t, p] for t, p in entry["decoded"]]})
    page = {
        "title": f"fvkit run: {result.model} on {dataset.name}",
        "dataset": dataset.name,
        "fixed_trials_id": result.trials_id,
        "settings": result.settings,
        "environment": package_versions(),
    }
    files["report.html"] = render_html(page, {result.model: entry}).encode("utf-8")
    return files
