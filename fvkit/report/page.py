"""One self-contained HTML page for a parity report or a run: gates, drifts, figures, tokens.

    html = render_html(json.load(open("results_fv/antonym/<trials_id>/parity_suite_report.json")),
                       {"tiny-llama": {"heatmap_png": png, "sweep_png": None,
                                       "decoded": [(" cold", 0.12)], "top_heads": [[1, 2, 0.03]]}})
    write_html_report("results_fv/antonym/<trials_id>/parity_suite_report.json", models)
    # -> results_fv/antonym/<trials_id>/parity_suite_report.html

The page needs nothing but a browser: styles are inline, figures are embedded
as base64 ``data:`` URIs, and there are no scripts or external links. The
report dict is the layout :mod:`fvkit.parity.report` writes; every key is
optional, so the same renderer serves ``fvkit run`` (no gates) and a parity
session that was interrupted half way.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Optional

from fvkit.method.data import atomic_write_text
from fvkit.errors import DataError
from fvkit.parity.records import GateOutcome, tie_resolved_text
from fvkit.parity.registry import GATES

HTML_NAME = "parity_suite_report.html"
STATUS_CLASS = {"PASS": "pass", "FAIL": "fail", "ERROR": "error", "SKIP": "skip", "NOT COMPARED": "skip"}

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d2125; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 1.5em; margin-bottom: 4px; } h2 { font-size: 1.2em; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin: 18px 0 6px; }
.meta { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 8px 0 14px; font-size: 0.88em; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f3f5f7; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.pass { background: #d8f5dd; color: #11552a; font-weight: 600; }
td.fail { background: #ffd7d5; color: #82071e; font-weight: 600; }
td.error { background: #ffe2b3; color: #7a3b00; font-weight: 600; }
td.skip { background: #eef0f2; color: #57606a; } td.none { color: #8c959f; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.85em; font-weight: 600; }
.badge.ok { background: #d8f5dd; color: #11552a; } .badge.bad { background: #ffd7d5; color: #82071e; }
.bar { display: inline-block; height: 9px; background: #57a773; vertical-align: middle; }
.bar.over { background: #cf222e; }
figure { margin: 8px 0 16px; } figure img { max-width: 100%; border: 1px solid #e1e4e8; }
figcaption { font-size: 0.85em; color: #555; }
.tokens td:first-child { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
pre.cause.skip { background: #f6f8fa; border-left-color: #8c959f; }
pre.cause { white-space: pre-wrap; background: #fff8f8; border-left: 3px solid #cf222e; padding: 6px 10px;
            font-size: 0.82em; margin: 4px 0 10px; }
.model { border: 1px solid #e1e4e8; border-radius: 6px; padding: 4px 16px 12px; margin: 16px 0; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
            return _e(value)
        if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.{digits}g}" if isinstance(value, float) else str(value)
    return _e(value)


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# --- report parts ---------------------------------------------------------------------

def gate_names(report: dict) -> list:
    found = set()
    for statuses in (report.get("summary") or {}).values():
        found.update((statuses or {}).keys())
    for entry in (report.get("models") or {}).values():
        found.update(((entry or {}).get("gates") or {}).keys())
    ordered = [g for g in GATES if g in found]
    return ordered + sorted(found - set(ordered))


def gate_status(report: dict, model: str, gate: str) -> Optional[str]:
    status = ((report.get("summary") or {}).get(model) or {}).get(gate)
    if status:
        return status
    gate_entry = (((report.get("models") or {}).get(model) or {}).get("gates") or {}).get(gate)
    return (gate_entry or {}).get("status") if isinstance(gate_entry, dict) else None


def _tests(report: dict):
    """(model, gate, GateOutcome) for every gate test in the report, read back as records."""
    for model, entry in (report.get("models") or {}).items():
        for gate, gate_entry in ((entry or {}).get("gates") or {}).items():
            for test in (gate_entry or {}).get("tests") or []:
                yield model, gate, GateOutcome.from_dict(test, model, gate)


def drift_rows(report: dict) -> list:
    """(model, gate, test name, DriftRecord) for every drift measured in the report."""
    return [(model, gate, test.test, d) for model, gate, test in _tests(report)
            for by_source in test.comparisons.values() for check in by_source.values() for d in check.drifts]


def _gate_table(report: dict) -> str:
    gates = gate_names(report)
    models = list(dict.fromkeys([*(report.get("summary") or {}), *(report.get("models") or {})]))
    if not gates or not models:
        return ""
    head = "".join(f"<th>{_e(g)}</th>" for g in gates)
    body = []
    for model in models:
        cells = []
        for gate in gates:
            status = gate_status(report, model, gate)
            cls = STATUS_CLASS.get(status or "", "none")
            cells.append(f'<td class="{cls}">{_e(status or "-")}</td>')
        body.append(f"<tr><th>{_e(model)}</th>{''.join(cells)}</tr>")
    causes = []
    for model, entry in (report.get("models") or {}).items():
        for gate, gate_entry in ((entry or {}).get("gates") or {}).items():
            cause = (gate_entry or {}).get("cause")
            if cause:
                status = gate_entry.get("status")
                # A passing or skipped gate's "cause" is why some of its tests were skipped.
                cls = "cause" if status in ("FAIL", "ERROR") else "cause skip"
                label = _e(status) if cls == "cause" else f"{_e(status)}, with skipped tests"
                causes.append(f"<h3>{_e(model)} {_e(gate)}: {label}</h3>"
                              f'<pre class="{cls}">{_e(cause)}</pre>')
    return (f"<h2>Gates</h2><table><tr><th>model</th>{head}</tr>{''.join(body)}</table>"
            f"<p class='meta'>-: the gate did not run for this model (not selected, or the session "
            f"stopped before it).</p>" + "".join(causes))


def _drift_table(report: dict) -> str:
    rows = drift_rows(report)
    if not rows:
        return ""
    out = ["<h2>Drift against tolerance</h2>",
           "<p class='meta'>Largest absolute difference from the reference (or snapshot), relative to the "
           "largest |reference| entry; the bar shows it as a share of the gate's tolerance (at noise level, the "
           "absolute drift as a share of the stage's absolute floor).</p>",
           "<table><tr><th>model</th><th>gate</th><th>stage</th><th>against</th><th>relative drift</th>"
           "<th>tolerance</th><th>drift / tolerance</th><th>max abs drift</th><th>within</th></tr>"]
    for model, gate, test, d in rows:
        rel, tol = d.rel_drift, d.tol
        share = d.share if isinstance(rel, (int, float)) and isinstance(tol, (int, float)) and tol > 0 else None
        bar = ""
        if share is not None and math.isfinite(share):
            width = max(1, int(round(min(share, 1.0) * 120)))
            bar = f'<span class="bar{" over" if share > 1 else ""}" style="width:{width}px"></span> {share:.2%}'
        elif share is not None:
            bar = "inf"
        tol_text = f"{_e(d.tol_name or '')} = {_num(tol)}" if tol is not None else "-"
        if d.noise_level and not d.problem:
            # Below float32's resolution the absolute floor decides; the page says so.
            tol_text = f"{_e(d.floor_name)} = {_num(d.floor)} (absolute)<br><small>{_e(d.noise_text())}</small>"
        badge = '<span class="badge ok">yes</span>' if d.ok else '<span class="badge bad">no</span>'
        problem = f"<br><small>{_e(test)}</small>" if test else ""
        problem += f"<br><small>{_e(d.problem)}</small>" if d.problem else ""
        out.append(f"<tr><td>{_e(model)}</td><td>{_e(gate)}</td><td>{_e(d.stage)}{problem}</td>"
                   f"<td>{_e(d.source)}</td><td class='num'>{_num(rel)}</td><td>{tol_text}</td>"
                   f"<td>{bar}</td><td class='num'>{_num(d.max_abs_drift)}</td><td>{badge}</td></tr>")
    out.append("</table>")
    return "".join(out)


def exact_rows(report: dict) -> list:
    """(model, gate, check key, source, Comparison) for every comparison recorded in the report:
    its exact-match part (prompts, token ids, heads, rank lists, the layer sweep)."""
    return [(model, gate, key, source, check) for model, gate, test in _tests(report)
            for key, by_source in test.comparisons.items() for source, check in by_source.items()]


def _exact_table(report: dict) -> str:
    rows = exact_rows(report)
    if not rows:
        return ""
    out = ["<h2>Exact comparisons</h2>",
           "<p class='meta'>What must equal the reference exactly: prompts and tokens (M1), top heads and every "
           "rank list (M4, the layer sweep included). Rank differences that fvkit's own logits show to be float "
           "ties are accepted, written as tie-resolved with their count and listed in the notes.</p>",
           "<table><tr><th>model</th><th>gate</th><th>check</th><th>against</th><th>result</th></tr>"]
    for model, gate, key, source, check in rows:
        mism = check.mismatches
        if mism:
            text = "; ".join(f"{m.path}: fvkit {m.fvkit} vs reference {m.reference}"
                             for m in mism[:3]) + (f" (+{len(mism) - 3} more)" if len(mism) > 3 else "")
            cell = f"<td class='fail'>{_e(text)}</td>"
        else:
            ties = [n for n in check.notes if "float tie" in n]
            # Reports written before the count was kept: the note starts with it.
            count = check.tie_count or next((int(n.split()[0]) for n in ties if n.split()[0].isdigit()), 0)
            cell = "<td class='pass'>identical</td>" if not ties and not count else \
                f"<td class='pass'>{_e(tie_resolved_text(count))}" + (f": {_e(ties[0][:300])}" if ties else "") + "</td>"
        out.append(f"<tr><td>{_e(model)}</td><td>{_e(gate)}</td><td>{_e(key)}</td><td>{_e(source)}</td>{cell}</tr>")
        # Stages the reference cannot compute: shown as such, never as a match.
        out.extend(f"<tr><td>{_e(model)}</td><td>{_e(gate)}</td><td>{_e(stage)}</td><td>{_e(source)}</td>"
                   f"<td class='skip'>NOT COMPARED: {_e(why)}</td></tr>" for stage, why in check.not_compared.items())
    out.append("</table>")
    return "".join(out)


def _kv_table(mapping: dict, title: str = "") -> str:
    if not mapping:
        return ""
    def cell(v):
        if isinstance(v, (dict, list)):
            return _e(json.dumps(v))
        return _num(v) if isinstance(v, float) else _e(v)
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{cell(v)}</td></tr>" for k, v in mapping.items())
    return (f"<h3>{_e(title)}</h3>" if title else "") + f"<table>{rows}</table>"


def _figure(data: Optional[bytes], alt: str, caption: str) -> str:
    if not data:
        return ""
    return (f'<figure><img alt="{_e(alt)}" src="{png_data_uri(data)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


#: What a tiny model's section says first: its numbers test plumbing, not the method.
RANDOM_WEIGHTS_TEXT = ("Random weights (a zoo recipe, not a trained checkpoint): every accuracy is 0 and the "
                       "indirect effects are float noise, so this section tests plumbing only, that fvkit "
                       "computes what the reference computes, not that the method finds anything.")
TRAINED_TEXT = "Trained checkpoint: its accuracies and indirect effects carry signal."
#: Added where the reference's numbers stand beside fvkit's.
WITH_REFERENCE_TEXT = " The reference's numbers (its live run, else its stored M4 snapshot) stand beside fvkit's."
#: The legend under every table that may hold a "-" cell.
DASH_LEGEND = ("-: no reference number (no live reference run or stored snapshot for these settings, or a row "
               "the reference's M4 result does not hold, such as the layer sweep's best layer).")


def _results_table(metrics: dict, reference: dict) -> str:
    """fvkit's accuracies, and the reference's beside them when there are any."""
    ref = (reference or {}).get("metrics") or {}
    if not ref:
        return _kv_table(metrics, "Results")
    rows = "".join(f"<tr><th>{_e(k)}</th><td class='num'>{_num(v)}</td>"
                   f"<td class='num'>{_num(ref[k]) if k in ref else '-'}</td></tr>" for k, v in metrics.items())
    return ("<h3>Results: fvkit and the reference</h3><table><tr><th>accuracy</th><th>fvkit</th>"
            f"<th>reference</th></tr>{rows}</table><p class='meta'>{_e(DASH_LEGEND)}</p>")


def _heads_table(info: dict) -> str:
    heads = info.get("head_effects") or [list(h) + [None] for h in info.get("top_heads") or []]
    if not heads:
        return ""
    ref_heads = ((info.get("reference") or {}).get("top_heads")) or []
    ref_rank = {(int(h[0]), int(h[1])): i for i, h in enumerate(ref_heads, start=1)}
    ref_col = "<th>rank in the reference's list</th>" if ref_heads else ""
    rows = []
    for i, h in enumerate(heads, start=1):
        effect = h[3] if len(h) > 3 and h[3] is not None else (h[2] if len(h) > 2 else None)
        cell = f"<td class='num'>{ref_rank.get((int(h[0]), int(h[1])), '-')}</td>" if ref_heads else ""
        rows.append(f"<tr><td class='num'>{i}</td><td class='num'>{_e(h[0])}</td><td class='num'>{_e(h[1])}</td>"
                    f"<td class='num'>{_num(effect)}</td>{cell}</tr>")
    legend = (f"<p class='meta'>Mean indirect effect over trials, unrounded; values below 1e-3 in scientific "
              f"notation.{' -: not among the reference top heads.' if ref_heads else ''}</p>")
    return ("<h3>Top heads</h3><table><tr><th>rank</th><th>layer</th><th>head</th>"
            f"<th>mean indirect effect</th>{ref_col}</tr>{''.join(rows)}</table>" + legend)


def _scale_section(info: dict) -> str:
    """Each vector's norm against the residual stream at the edit layer, and the < 1% warning."""
    scales = info.get("vector_scale") or {}
    if not scales:
        return ""
    names = {"function_vector": "reference-defined", "block_written_vector": "as the block writes it"}
    rows = "".join(f"<tr><th>{_e(names.get(k, k))}</th><td class='num'>{_num(v['vector_norm'])}</td>"
                   f"<td class='num'>{_num(v['residual_norm'])}</td><td class='num'>{v['ratio']:.3%}</td></tr>"
                   for k, v in scales.items())
    how = next(iter(scales.values())).get("measured", "")
    warnings = "".join(f'<pre class="cause">warning: {_e(w)}</pre>' for w in info.get("warnings") or [])
    return ("<h3>Vector size against the residual stream</h3><table><tr><th>vector</th><th>norm</th>"
            f"<th>residual stream norm</th><th>ratio</th></tr>{rows}</table><p class='meta'>{_e(how)}</p>"
            + warnings)


def _block_written_section(info: dict) -> str:
    written = info.get("block_written")
    if not written:
        return ""
    rows = []
    for stage, label in (("zero_shot", "zero-shot"), ("shuffled", "shuffled-label")):
        ref, block = written[stage]["function_vector"], written[stage]["block_written_vector"]
        rows.append(f"<tr><th>{label} top-1</th><td class='num'>{_num(ref['top1_no_vector'])}</td>"
                    f"<td class='num'>{_num(ref['top1_with_vector'])}</td>"
                    f"<td class='num'>{_num(block['top1_with_vector'])}</td></tr>")
    return ("<h3>The vector as the block writes it</h3><table><tr><th>stage</th><th>no vector</th>"
            "<th>reference-defined vector</th><th>as the block writes it</th></tr>" + "".join(rows)
            + f"</table><p class='meta'>{_e(written.get('about', ''))}</p>")


def _model_section(name: str, info: dict, entry: dict) -> str:
    parts = [f'<div class="model"><h2>{_e(name)}</h2>']
    if "trained" in info:
        text = TRAINED_TEXT if info["trained"] else RANDOM_WEIGHTS_TEXT
        if info["trained"] and (info.get("reference") or {}).get("metrics"):
            text += WITH_REFERENCE_TEXT
        parts.append(f"<p class='meta'>{_e(text)}</p>")
    metrics = info.get("metrics") or {}
    if metrics:
        parts.append(_results_table(metrics, info.get("reference")))
    parts.append(_scale_section(info))
    parts.append(_block_written_section(info))
    parts.append(_heads_table(info))
    parts.append(_figure(info.get("heatmap_png"), f"indirect-effect heatmap of {name}",
                         "Mean indirect effect of each attention head; top heads boxed."))
    parts.append(_figure(info.get("sweep_png"), f"layer sweep of {name}",
                         "Accuracy with the function vector added at each layer; dashed lines: no vector."))
    decoded = info.get("decoded") or []
    if decoded:
        rows = "".join(f"<tr><td>{_e(repr(t[0]))}</td><td class='num'>{_num(t[1])}</td></tr>" for t in decoded)
        parts.append("<h3>Function vector decoded through the output layer</h3>"
                     f"<table class='tokens'><tr><th>token</th><th>probability</th></tr>{rows}</table>")
    seconds = lambda t: {k: f"{v:.2f} s" if isinstance(v, (int, float)) else v for k, v in t.items()}
    timings = (entry or {}).get("stage_timings") or info.get("timings") or {}
    if timings:
        parts.append(_kv_table(seconds(timings), "Timings"))
    ref_timings = ((entry or {}).get("reference") or {}).get("live_timings") or {}
    if ref_timings:
        parts.append(_kv_table(seconds(ref_timings), "Reference stage timings (live run, same process)"))
    if len(parts) == 1 or not any(parts[1:]):
        parts.append("<p class='meta'>No figures, heads or tokens were recorded for this model.</p>")
    release = ((entry or {}).get("reference") or {}).get("reference_transformers")
    if release:
        parts.append(f"<p class='meta'>Reference numbers of this model come from transformers {_e(release)}.</p>")
    parts.append("</div>")
    return "".join(parts)


def render_html(report: dict, models: Optional[dict] = None) -> str:
    """The whole page as a string. ``models`` maps a model name to its figures and tokens:
    ``{"heatmap_png": bytes|None, "sweep_png": bytes|None, "decoded": [(token, prob)],
    "top_heads": [[layer, head, score]], "metrics": {label: value} (optional)}``."""
    report = report or {}
    models = models or {}
    title = report.get("title") or "fvkit parity report"
    sub = " / ".join(_e(x) for x in (report.get("dataset"), report.get("fixed_trials_id")) if x)
    state = ""
    if "complete" in report:
        state = ('<span class="badge ok">complete</span>' if report.get("complete")
                 else '<span class="badge bad">incomplete: the session did not finish</span>')
    times = ", ".join(f"{k} {_e(report[k])}" for k in ("started", "finished") if report.get(k))
    if report.get("exit_status") is not None:
        times += f", exit status {_e(report['exit_status'])}"
    body = [f"<h1>{_e(title)}</h1>", f"<p class='meta'>{sub} {state}<br>{times}</p>"]
    body.append(_gate_table(report))
    body.append(_drift_table(report))
    body.append(_exact_table(report))
    entries = report.get("models") or {}
    for name in dict.fromkeys([*models, *entries]):
        gates = set(((entries.get(name) or {}).get("gates") or {}))
        if name not in models and gates <= {"M5"}:
            continue  # a model only the spec check used: its row in the gate table says it all
        body.append(_model_section(name, models.get(name) or {}, entries.get(name) or {}))
    notes = report.get("notes") or []
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    if report.get("settings"):
        body.append("<h2>Settings</h2>" + _kv_table(report["settings"]))
    if report.get("tolerances"):
        body.append("<h2>Tolerances</h2>" + _kv_table(report["tolerances"]))
    body.append("<h2>Environment</h2>" + (_kv_table(report.get("environment") or {}) or "<p>not recorded</p>"))
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            + "".join(body) + "</body></html>\n")


#: Figure fields of a model entry, carried as base64 text between processes.
PNG_FIELDS = ("heatmap_png", "sweep_png")


def pack_entry(entry: dict) -> dict:
    """A model entry as plain JSON-able data (figures as base64 text), for shipping from
    an xdist worker to the process that writes the page; :func:`unpack_entry` reverses it."""
    out = {k: v for k, v in entry.items() if k not in PNG_FIELDS}
    out.update({k: base64.b64encode(entry[k]).decode("ascii") for k in PNG_FIELDS if entry.get(k)})
    out["decoded"] = [list(t) for t in entry.get("decoded") or []]
    return out


def unpack_entry(packed: dict) -> dict:
    out = dict(packed)
    out.update({k: base64.b64decode(packed[k]) for k in PNG_FIELDS if packed.get(k)})
    return out


def write_html_report(report_json_path, models: Optional[dict] = None, out_path=None) -> Path:
    """Render the parity report at ``report_json_path`` to ``parity_suite_report.html`` beside it."""
    source = Path(report_json_path)
    try:
        report = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"parity report {source} does not exist; run the parity suite first "
                        f"(it writes results_fv/<dataset>/<trials_id>/parity_suite_report.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"parity report {source} is not valid JSON ({err}); rerun the parity suite") from None
    if not isinstance(report, dict):
        raise DataError(f"parity report {source} holds a {type(report).__name__}, expected a JSON object")
    return atomic_write_text(out_path or source.with_name(HTML_NAME), render_html(report, models))
