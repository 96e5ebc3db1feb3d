"""The HTML page: gate table, drifts, embedded figures, tokens, environment; self-contained."""

import base64
import json
import os
import re
import shutil
import subprocess

import matplotlib.image as mpimg
import pytest
import torch

from fvkit.errors import DataError
from fvkit.report.figures import cie_heatmap, layer_sweep_plot
from fvkit.report.page import HTML_NAME, drift_rows, render_html, write_html_report
from fvkit.parity.report import REPORT_NAME, GateOutcome, ReportState
from fvkit.parity.drift import tensor_drift
from fvkit.parity.records import Comparison, Findings
from fvkit.parity.tolerances import IE_REL_TOL, MEAN_ACT_REL_TOL

#: Seconds a headless browser may take to render one page.
BROWSER_TIMEOUT_S = 120


def gate_comparisons(gate, stage, ours, ref, tol, tol_name):
    check = Comparison(gate, "reference")
    check.drifts.append(tensor_drift(stage, ours, ref, tol, tol_name))
    return {gate: {"reference": check}}


@pytest.fixture(scope="module")
def parity_report():
    """A report in the parity plugin's own layout: one model passing, one failing M3."""
    state = ReportState(".", environment={"torch": torch.__version__, "transformers": "5.x", "python": "3.11"},
                        writer=False)
    state.bind("antonym", "fixed_trials_antonym_t10_s10_seed0", {"max_trials": 1})
    ref = torch.ones(3, 4)
    for model, bad in (("tiny-llama", False), ("tiny-<gpt2>", True)):
        state.record(GateOutcome(f"{model}::m1", model, "M1", "test_prompts", "PASS"))
        state.record(GateOutcome(f"{model}::m2", model, "M2", "test_mean_activations", "PASS",
                                 comparisons=gate_comparisons("M2", "mean_activations", ref + 1e-7, ref,
                                                      MEAN_ACT_REL_TOL, "MEAN_ACT_REL_TOL")))
        state.record(GateOutcome(
            f"{model}::m3", model, "M3", "test_indirect_effect", "FAIL" if bad else "PASS",
            cause="indirect_effect vs reference: drift exceeds <IE_REL_TOL>" if bad else "",
            comparisons=gate_comparisons("M3", "indirect_effect", ref + (1e-3 if bad else 1e-7), ref, IE_REL_TOL, "IE_REL_TOL")))
        state.record(GateOutcome(f"{model}::m5", model, "M5", "test_spec", "SKIP"))
    state.finish(1, interrupted=False)
    return state.as_dict()


@pytest.fixture(scope="module")
def figures():
    heat = cie_heatmap(torch.linspace(-1, 1, 12).reshape(3, 4), [[2, 3, 1.0]], title="heat", caption="c")
    topk = lambda a: [[1, a], [2, a], [3, a]]
    sweep = {"layers": [0, 1, 2], "n_layers": 3, "stages": {
        s: {"clean_topk": topk(0.2), "intervention_topk": [topk(0.3), topk(0.8), topk(0.5)]} for s in ("zero_shot", "shuffled")}}
    return {"tiny-llama": {"heatmap_png": heat, "sweep_png": layer_sweep_plot(sweep), "top_heads": [[2, 3, 0.0123]],
                           "decoded": [(" cold", 0.25), ("<b>", 0.01)], "metrics": {"zero-shot top-1": 0.8}}}


@pytest.fixture(scope="module")
def page(parity_report, figures):
    return render_html(parity_report, figures)


def gate_cells(page):
    table = page.split("<h2>Gates</h2>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", table)
    return {model: re.findall(r'<td class="(\w+)">(\w+|-)</td>', cells) for model, cells in rows}


def test_gate_table_has_every_model_and_gate_status(page):
    cells = gate_cells(page)
    assert cells["tiny-llama"] == [("pass", "PASS"), ("pass", "PASS"), ("pass", "PASS"), ("skip", "SKIP")]
    assert cells["tiny-&lt;gpt2&gt;"] == [("pass", "PASS"), ("pass", "PASS"), ("fail", "FAIL"), ("skip", "SKIP")]
    assert "drift exceeds &lt;IE_REL_TOL&gt;" in page


def test_drifts_are_listed_against_their_tolerance(parity_report, page):
    rows = drift_rows(parity_report)
    assert len(rows) == 4
    failing = [d for model, gate, _, d in rows if not d.ok]
    assert len(failing) == 1 and failing[0].tol_name == "IE_REL_TOL"
    assert page.count("IE_REL_TOL = ") == 2 and page.count("MEAN_ACT_REL_TOL = ") == 2
    assert page.count('class="bar over"') == 1 and page.count('<span class="badge bad">no</span>') == 1


def test_figures_are_embedded_pngs(page, figures, tmp_path):
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 2
    decoded = [base64.b64decode(u) for u in uris]
    assert decoded == [figures["tiny-llama"]["heatmap_png"], figures["tiny-llama"]["sweep_png"]]
    (tmp_path / "x.png").write_bytes(decoded[0])
    assert mpimg.imread(tmp_path / "x.png").shape[0] > 100


def test_tokens_heads_environment_and_escaping(page):
    assert "&#x27; cold&#x27;" in page and "&lt;b&gt;" in page and "<b>" not in page
    assert "0.0123" in page and "zero-shot top-1" in page
    env = page.split("<h2>Environment</h2>", 1)[1]
    assert "transformers" in env and torch.__version__ in env
    assert "session did not finish" not in page  # finished, though with a failure


def test_page_is_self_contained(page):
    assert not re.search(r"(?i)<script|<link|@import|url\(|https?://", page)
    assert re.findall(r'src="([^"]{0,22})', page) == ["data:image/png;base64,"] * 2


def test_missing_keys_are_tolerated():
    html = render_html({}, {})
    assert html.startswith("<!DOCTYPE html>") and "<h2>Gates</h2>" not in html and "not recorded" in html
    partial = render_html({"complete": False, "summary": {"m": {"M1": "ERROR"}}}, {"m": {"heatmap_png": None}})
    assert "session did not finish" in partial and '<td class="error">ERROR</td>' in partial


def test_write_html_report_puts_the_page_beside_the_json(tmp_path, parity_report, figures):
    report_json = tmp_path / "results_fv" / "antonym" / "t" / REPORT_NAME
    report_json.parent.mkdir(parents=True)
    report_json.write_text(json.dumps(parity_report))
    out = write_html_report(report_json, figures)
    assert out == report_json.with_name(HTML_NAME)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([REPORT_NAME, HTML_NAME])
    assert out.read_text(encoding="utf-8") == render_html(parity_report, figures)


@pytest.mark.parametrize("content,message", [(None, "does not exist"), ("{not json", "not valid JSON"),
                                              ("[1, 2]", "expected a JSON object")])
def test_write_html_report_bad_json(tmp_path, content, message):
    path = tmp_path / REPORT_NAME
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        write_html_report(path)
    assert not (tmp_path / HTML_NAME).exists()


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_page_renders_in_headless_chromium(tmp_path, page):
    browser = find_chromium()
    if browser is None:
        pytest.skip("no headless browser: install Debian's `chromium` package "
                    "(apt-get install -y chromium) to render the report page")
    html_path = tmp_path / "report.html"
    html_path.write_text(page, encoding="utf-8")
    shot = tmp_path / "screenshot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1280,2400", html_path.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = mpimg.imread(shot)
    assert img.shape[:2] == (2400, 1280)
    # The page draws coloured status cells and two figures: far from a blank white canvas.
    assert img[..., :3].std() > 0.05
    keep = os.environ.get("FVKIT_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_packed_entry_survives_a_json_round_trip(figures):
    from fvkit.report.page import pack_entry, unpack_entry

    packed = json.loads(json.dumps(pack_entry(figures["tiny-llama"])))
    back = unpack_entry(packed)
    assert back["heatmap_png"] == figures["tiny-llama"]["heatmap_png"]
    assert back["sweep_png"] == figures["tiny-llama"]["sweep_png"]
    assert back["decoded"] == [[" cold", 0.25], ["<b>", 0.01]]


def test_report_state_writes_the_page_beside_the_json_with_each_models_figures(tmp_path, figures):
    from fvkit.report.page import pack_entry

    state = ReportState(tmp_path, environment={"torch": torch.__version__})
    state.bind("antonym", "fixed_trials_antonym_t10_s10_seed0", {})
    state.record(GateOutcome("a::m1", "tiny-llama", "M1", "test_prompts", "PASS"),
                 Findings(page=pack_entry(figures["tiny-llama"])))
    state.record(GateOutcome("b::m1", "tiny-gpt2", "M1", "test_prompts", "PASS"))
    out = tmp_path / "results_fv" / "antonym" / "fixed_trials_antonym_t10_s10_seed0"
    assert not (out / HTML_NAME).exists()  # the top level waits for a complete report
    assert "incomplete" in (state.run_dir / HTML_NAME).read_text()   # the session's own copy, as tests report
    state.finish(0, interrupted=False)
    html_page = (out / HTML_NAME).read_text()
    assert (out / HTML_NAME) in state.paths_written and (out / REPORT_NAME).is_file()
    assert ">complete<" in html_page and html_page.count("data:image/png;base64,") == 2
    assert "&#x27; cold&#x27;" in html_page and "tiny-gpt2" in html_page


def test_exact_comparisons_show_identical_and_the_first_mismatches():
    from fvkit.parity.compare import compare_gate

    ev = {"clean_rank_list": [0, 3], "intervention_rank_list": [0, 1], "clean_topk": [[1, 0.5]],
          "intervention_topk": [[1, 0.5]]}
    sweep = lambda r: {"layer_sweep": {"zero_shot": [ev, {**ev, "intervention_rank_list": [r, 1]}]}}
    same = compare_gate("M4", sweep(0), sweep(0), "live reference").as_dict()
    differs = compare_gate("M4", sweep(7), sweep(0), "snapshot").as_dict()
    report = {"models": {"smollm2-135m": {"gates": {"M4": {"status": "FAIL", "tests": [
        {"test": "test_layer_sweep", "metrics": {"M4[layer sweep]": {"live reference": same, "snapshot": differs}}}]}}}}}
    page = render_html(report)
    table = page.split("<h2>Exact comparisons</h2>", 1)[1].split("</table>", 1)[0]
    assert "<td class='pass'>identical</td>" in table
    assert "layer_sweep.zero_shot[layer 1].intervention_rank_list[0]: fvkit 7 vs reference 0" in table


def test_spec_only_models_get_no_section_and_skips_are_not_styled_as_failures():
    report = {"summary": {"real": {"M3": "PASS", "M5": "PASS"}, "tiny-x": {"M5": "PASS"}},
              "models": {"real": {"gates": {"M3": {"status": "PASS", "cause": "test_exact: --ie-mode fast"}},
                                  "reference": {"live_timings": {"indirect_effect": 1620.5}}},
                         "tiny-x": {"gates": {"M5": {"status": "PASS"}}}}}
    page = render_html(report, {})
    assert "<h2>real</h2>" in page and "<h2>tiny-x</h2>" not in page
    assert '<pre class="cause skip">test_exact: --ie-mode fast</pre>' in page and "PASS, with skipped tests" in page
    assert "Reference stage timings" in page and "1620.50 s" in page
