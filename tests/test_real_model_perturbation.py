"""The real-model gates can fail: one head of one out-projection scaled by 1.001 fails M2, M3 and M4.

The perturbed model runs fvkit's stages at the settings of its stored reference
snapshots and is compared with them exactly as the gates compare: the snapshots
hold the reference's numbers for the unperturbed model, so a gate that passed
here would not tell a 0.1% change of one head from the real model.

The head is the lowest-layer head of the reference's function vector: its
change reaches every later layer's activations (M2), its own indirect effect
(M3, one of the largest) and the vector itself (M4).
"""

import json
from pathlib import Path

import pytest
import torch

from fvkit.method.data import load_task_dataset
from fvkit.method.fixed_trials import FixedTrials
from fvkit.models import adapters
from fvkit.models.loader import load_model
from fvkit.parity.compare import compare_gate, gate_part
from fvkit.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT / "parity_tests" / "__snapshots__"
DATASET = "present-past"
#: The real models with stored reference snapshots,
#: each with the fixture that skips it when its checkpoint package is not installed.
REAL_MODELS = {"smollm2-135m": "smollm2_available", "gemma3-270m": "gemma3_available"}
#: The perturbation: 0.1% on one head's slice of one out-projection.
SCALE = 1.001
#: Snapshot file per gate (M3: the fast mode, which real checkpoints check).
GATE_FILES = {
    "M2": ("test_m2_mean_activations", "test_mean_activations"),
    "M3": ("test_m3_indirect_effect", "test_indirect_effect_fast"),
    "M4": ("test_m4_function_vector", "test_function_vector"),
}


def stored(model: str) -> dict:
    """``{gate: snapshot}`` for one settings key: the stored key with the fewest trials (the cheapest)."""
    def files(gate, key="*"):
        folder, test = GATE_FILES[gate]
        return sorted((SNAPSHOTS / folder).glob(f"{test}[[]{model}[]][[]fixed_trials_{DATASET}_{key}].json"))

    candidates = [json.loads(p.read_text()) for p in files("M4")]
    if not candidates:
        # As the gates do: settings without reference numbers are skipped with the reason, never passed.
        pytest.skip(f"no M4 snapshot of {model} on {DATASET}; record the reference's numbers first "
                    f"(docs/parity_suite.md, 'Regenerating snapshots')")
    m4 = min(candidates, key=lambda snap: snap["settings"]["n_trials_used"])
    key = m4["key"].split(f"fixed_trials_{DATASET}_", 1)[1]
    out = {"M4": m4}
    for gate in ("M2", "M3"):
        found = files(gate, key)
        if not found:
            pytest.skip(f"no {gate} snapshot of {model} for {m4['key']}; record the reference's numbers first")
        out[gate] = json.loads(found[0].read_text())
    return out


def scale_head(lm, layer: int, head: int, factor: float) -> None:
    """Scale the out-projection's input columns (or Conv1D rows) that read ``head``."""
    proj = adapters.resolve_out_proj(lm.model, lm.spec, layer)
    cols = slice(head * lm.dims.head_dim, (head + 1) * lm.dims.head_dim)
    with torch.no_grad():
        if adapters.is_conv1d(proj):
            proj.weight[cols, :] *= factor
        else:
            proj.weight[:, cols] *= factor


@pytest.mark.slow
@pytest.mark.parametrize("model", REAL_MODELS)
def test_one_head_scaled_by_1_001_fails_m2_m3_m4(model, request):
    request.getfixturevalue(REAL_MODELS[model])
    snaps = stored(model)
    settings = snaps["M4"]["settings"]
    layer, head = min(((int(l), int(h)) for l, h, _ in snaps["M4"]["value"]["top_heads"]))
    dataset = load_task_dataset(DATASET)
    trials = FixedTrials.load(ROOT / "datasets" / "fixed_trials" / f"fixed_trials_{DATASET}_t10_s10_seed0.json",
                              dataset)
    lm = load_model(model)
    scale_head(lm, layer, head, SCALE)
    result = run_pipeline(lm, dataset, trials, n_top_heads=settings["n_top_heads"], edit_layer=settings["edit_layer"],
                          max_trials=settings["n_trials_used"], ie_mode="fast", show_progress=False)
    ours = result.comparable()
    verdicts = {gate: compare_gate(gate, gate_part(gate, ours), snaps[gate]["value"], "snapshot")
                for gate in GATE_FILES}
    passed = [gate for gate, check in verdicts.items() if check.ok]
    assert not passed, (f"{model} with head {head} of layer {layer}'s out-projection scaled by {SCALE} still "
                        f"passes {', '.join(passed)}")
