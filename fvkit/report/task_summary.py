"""The table across tasks of a multi-task ``fvkit run``, in the style of the paper's results table.

    rows = [summary_row(result) for result in results]
    files = summary_files(rows, model="smollm2-135m")   # {"summary.csv": b"...", "summary.md": b"..."}

One row per task: top-1 accuracy of the clean few-shot prompts, the zero-shot
prompts and the shuffled-label few-shot prompts, each without and with the
function vector at the run's edit layer (the clean few-shot prompts with the
vector only where the run evaluated them).
"""

from __future__ import annotations

import csv
import io

#: (column, header in the markdown table), in the paper's order.
COLUMNS = (
    ("task", "task"),
    ("n_items", "test items"),
    ("edit_layer", "edit layer"),
    ("few_shot", "clean few-shot"),
    ("few_shot_fv", "clean few-shot + FV"),
    ("zero_shot", "zero-shot"),
    ("zero_shot_fv", "zero-shot + FV"),
    ("shuffled", "shuffled-label"),
    ("shuffled_fv", "shuffled-label + FV"),
)


def _top1(evaluation: dict, key: str):
    topk = evaluation.get(key)
    return None if topk is None else float(topk[0][1])


def summary_row(task: str, result) -> dict:
    """One task's top-1 accuracies from its :class:`fvkit.pipeline.PipelineResult`."""
    zs, sh, base = result.zero_shot, result.shuffled, result.baseline
    return {"task": task, "n_items": zs["n_items"], "edit_layer": result.settings["edit_layer"],
            "few_shot": _top1(base, "clean_topk"), "few_shot_fv": _top1(base, "intervention_topk"),
            "zero_shot": _top1(zs, "clean_topk"), "zero_shot_fv": _top1(zs, "intervention_topk"),
            "shuffled": _top1(sh, "clean_topk"), "shuffled_fv": _top1(sh, "intervention_topk")}


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_csv(rows: list) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([key for key, _ in COLUMNS])
    for row in rows:
        writer.writerow(["" if row[key] is None else row[key] for key, _ in COLUMNS])
    return buf.getvalue()


def summary_markdown(rows: list, model: str, n_shots: int) -> str:
    lines = [f"# Top-1 accuracy per task: {model}", "",
             f"Clean and shuffled-label prompts are {n_shots}-shot; \"+ FV\" adds the function vector at the "
             f"run's edit layer.", "",
             "| " + " | ".join(header for _, header in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_files(rows: list, model: str, n_shots: int) -> dict:
    return {"summary.csv": summary_csv(rows).encode("utf-8"),
            "summary.md": summary_markdown(rows, model, n_shots).encode("utf-8")}
