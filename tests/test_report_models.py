"""The report page's model sections: trained models against the reference, random-weight ones as plumbing."""

import dataclasses
import html
import types
from pathlib import Path

import pytest
import torch

from fvkit.errors import SpecError
from fvkit.models.zoo import ZOO, is_trained
from fvkit.report.page import DASH_LEGEND, RANDOM_WEIGHTS_TEXT, TRAINED_TEXT, WITH_REFERENCE_TEXT, render_html
from fvkit.report.run_files import report_entry, run_metrics, sweep_ties

topk = lambda a: [[1, a], [2, a], [3, a]]


def _result(model, zs=0.0, zs_fv=0.0, sh=0.0, sh_fv=0.0, base=0.0, effects=None):
    ie = torch.zeros(2, 3, 4)
    ie[:, 1, 0] = 3e-8 if effects is None else effects
    ie[:, 2, 3] = 1e-9
    return types.SimpleNamespace(
        model=model, spec="llama", trials_id="t", top_heads=[[1, 0, round(float(ie[0, 1, 0]), 4)], [2, 3, 0.0]],
        timings={}, indirect_effect=ie, settings={"n_shots": 10, "edit_layer": 1, "n_trials_used": 2},
        zero_shot={"clean_topk": topk(zs), "intervention_topk": topk(zs_fv)},
        shuffled={"clean_topk": topk(sh), "intervention_topk": topk(sh_fv)}, baseline={"clean_topk": topk(base)})


def _section(page, model):
    return page.split(f"<h2>{model}</h2>", 1)[1].split('<div class="model">', 1)[0]


def test_the_zoo_says_which_models_are_trained():
    assert is_trained("smollm2-135m") and ZOO["smollm2-135m"].trained
    assert not any(is_trained(a) for a, e in ZOO.items() if e.source == "random")
    assert is_trained("some-org/some-hub-model")    # a released checkpoint, not a zoo recipe
    with pytest.raises(SpecError, match="'tiny-llama' is built with random weights.*cannot be trained=True"):
        dataclasses.replace(ZOO["tiny-llama"], trained=True).validate("llama.py")


def test_trained_and_random_sections_say_what_they_prove():
    real = _result("smollm2-135m", zs=0.0, zs_fv=0.3, sh=0.1, sh_fv=0.5, base=0.9, effects=0.042)
    reference = {"top_heads": [[1, 0, 0.042], [0, 2, 0.01]], "baseline": {"clean_topk": topk(0.9)},
                 "zero_shot": {"clean_topk": topk(0.0), "intervention_topk": topk(0.3)},
                 "shuffled": {"clean_topk": topk(0.1), "intervention_topk": topk(0.5)}}
    models = {"smollm2-135m": report_entry(real, "present-past", reference=reference),
              "tiny-llama": report_entry(_result("tiny-llama"), "present-past")}
    page = render_html({}, models)
    trained, tiny = _section(page, "smollm2-135m"), _section(page, "tiny-llama")
    said = lambda text: html.escape(text, quote=True)
    assert said(TRAINED_TEXT + WITH_REFERENCE_TEXT) in trained and said(RANDOM_WEIGHTS_TEXT) not in trained
    assert said(RANDOM_WEIGHTS_TEXT) in tiny and said(TRAINED_TEXT) not in tiny
    # The reference's accuracies beside fvkit's, with the legend for '-' cells.
    assert "<th>fvkit</th><th>reference</th>" in trained
    assert ("<tr><th>zero-shot top-1, vector at layer 1</th><td class='num'>0.3</td>"
            "<td class='num'>0.3</td></tr>") in trained
    assert said(DASH_LEGEND) in trained
    # Top heads with their effects; where each stands in the reference's list ('-': not in it).
    assert "<td class='num'>0.042</td><td class='num'>1</td>" in trained
    assert "<td class='num'>1.000e-09</td><td class='num'>-</td>" in trained
    # A random model's effects are shown as they are, not as the list's rounded 0.0.
    assert "3.000e-08" in tiny and "<td class='num'>0.0</td>" not in tiny


def test_no_best_layer_when_every_layer_ties():
    sweep = {"best_layer": {"zero_shot": 0, "shuffled": 2}, "stages": {
        "zero_shot": {"intervention_topk": [topk(0.0), topk(0.0), topk(0.0)]},
        "shuffled": {"intervention_topk": [topk(0.1), topk(0.2), topk(0.4)]}}}
    assert sweep_ties(sweep, "zero_shot") and not sweep_ties(sweep, "shuffled")
    metrics = run_metrics(_result("tiny-llama"), sweep)
    assert "zero-shot top-1, vector at any layer (every layer ties: no best layer)" in metrics
    assert not any(k.startswith("zero-shot top-1, vector at its best layer") for k in metrics)
    assert metrics["shuffled-label top-1, vector at its best layer (2)"] == 0.4


def test_gate_table_explains_dash_cells():
    page = render_html({"summary": {"tiny-llama": {"M1": "PASS"}, "tiny-gpt2": {"M2": "PASS"}}})
    assert '<td class="none">-</td>' in page and "-: the gate did not run for this model" in page


def test_the_page_reads_the_reference_from_the_stored_m4_snapshot(tmp_path):
    from fvkit.parity.session import M4_SNAPSHOT_DIR, stored_m4_reference

    root = Path(__file__).resolve().parents[1]
    stored = sorted((root / M4_SNAPSHOT_DIR).glob("test_function_vector[[]tiny-llama[]]*.json"))
    assert stored, "tiny-llama's M4 snapshots are committed"
    value = stored_m4_reference(stored[0])
    assert {"top_heads", "zero_shot", "shuffled", "baseline"} <= set(value)
    assert stored_m4_reference(tmp_path / "absent.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert stored_m4_reference(tmp_path / "bad.json") is None
