"""`fvkit run --edit-layer all`: sweep, figures, decoded tokens and the HTML page in the run directory."""

import base64
import json
import re

import pytest

from fvkit.cli.main import main
from fvkit.cli.pipeline import parse_edit_layer, sweeps_all_layers
from fvkit.errors import FvkitError
from fvkit.report.run_files import ARTIFACT_FILES, SWEEP_FILES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = ("apple bread chair dance eagle flame grape house island juice kettle lemon music night ocean "
         "paper queen river stone table uncle violin water yellow zebra garden pencil rabbit silver tiger").split()


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    """A 30-row task, so the sweep has a handful of test items and the run stays quick."""
    root = tmp_path_factory.mktemp("task")
    data = root / "upper.json"
    data.write_text(json.dumps([{"input": w, "output": w.upper()} for w in WORDS]))
    trials = root / "trials.json"
    assert main(["trials", "--dataset", str(data), "--n-trials", "2", "--n-shots", "3", "--out", str(trials)]) == 0
    return data, trials


@pytest.fixture(scope="module")
def sweep_run(small_task, tmp_path_factory):
    data, trials = small_task
    out = tmp_path_factory.mktemp("run") / "tiny-llama"
    code = main(["run", "--model", "tiny-llama", "--dataset", str(data), "--fixed-trials", str(trials),
                 "--max-trials", "1", "--n-top-heads", "3", "--edit-layer", "all", "--out", str(out)])
    assert code == 0
    return out


def test_sweep_run_writes_sweep_figures_tokens_and_page(sweep_run):
    for name in ARTIFACT_FILES + SWEEP_FILES:
        assert (sweep_run / name).is_file(), name
    assert (sweep_run / "cie_heatmap.png").read_bytes().startswith(PNG_MAGIC)
    assert (sweep_run / "layer_sweep.png").read_bytes().startswith(PNG_MAGIC)
    decoded = json.loads((sweep_run / "decoded_tokens.json").read_text())
    assert len(decoded["tokens"]) == 10 and all(isinstance(p, float) for _, p in decoded["tokens"])
    timings = json.loads((sweep_run / "timings.json").read_text())
    assert "layer_sweep" in timings


def test_single_layer_stage_files_use_the_default_layer_and_agree_with_the_sweep(sweep_run):
    run = json.loads((sweep_run / "run.json").read_text())
    layer = run["settings"]["edit_layer"]
    assert layer == 3 // 2  # tiny-llama has 3 layers
    sweep = json.loads((sweep_run / "layer_sweep.json").read_text())
    assert sweep["n_layers"] == 3 and sweep["method"] == "cached"
    for stage in ("zero_shot", "shuffled"):
        single = json.loads((sweep_run / f"eval_{stage}.json").read_text())
        s = sweep["stages"][stage]
        assert s["clean_rank_list"] == single["clean_rank_list"]
        assert s["intervention_rank_lists"][layer] == single["intervention_rank_list"]


def test_run_page_embeds_the_figures_without_a_gate_table(sweep_run):
    page = (sweep_run / "report.html").read_text(encoding="utf-8")
    images = [base64.b64decode(x) for x in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert images == [(sweep_run / "cie_heatmap.png").read_bytes(), (sweep_run / "layer_sweep.png").read_bytes()]
    assert "<h2>Gates</h2>" not in page and "Top heads" in page and "decoded through the output layer" in page
    assert "best layer" in page


def test_edit_layer_values():
    assert parse_edit_layer("all") is None and sweeps_all_layers("ALL") and not sweeps_all_layers("2")
    assert parse_edit_layer("2") == 2 and not sweeps_all_layers(None)
    with pytest.raises(FvkitError, match="a layer number or 'all'"):
        parse_edit_layer("every")


def test_report_entry_for_the_parity_page_needs_no_model():
    import types

    import torch

    from fvkit.report.page import render_html
    from fvkit.report.run_files import report_entry

    topk = lambda a: [[1, a], [2, a], [3, a]]
    result = types.SimpleNamespace(
        model="tiny-x", spec="llama", trials_id="t", top_heads=[[1, 0, 0.5]], timings={"indirect_effect": 1.0},
        indirect_effect=torch.rand(2, 3, 4), settings={"n_shots": 10, "edit_layer": 1, "n_trials_used": 2},
        zero_shot={"clean_topk": topk(0.1), "intervention_topk": topk(0.4)},
        shuffled={"clean_topk": topk(0.2), "intervention_topk": topk(0.5)}, baseline={"clean_topk": topk(0.9)})
    entry = report_entry(result, "antonym")
    assert entry["heatmap_png"].startswith(PNG_MAGIC) and entry["sweep_png"] is None and entry["decoded"] == []
    assert entry["metrics"]["clean 10-shot top-1"] == 0.9
    page = render_html({"summary": {"tiny-x": {"M1": "PASS"}}}, {"tiny-x": entry})
    assert page.count("data:image/png;base64,") == 1 and "indirect_effect" in page
