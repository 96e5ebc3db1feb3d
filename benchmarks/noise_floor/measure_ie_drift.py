"""Measure how far fvkit's indirect effects sit from the reference's snapshots on the tiny models.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/noise_floor/measure_ie_drift.py [--models tiny-llama ...]

For every tiny zoo model and every stored M3 snapshot (``-mt1-`` and ``-mt10-``
settings), fvkit's exact and fast indirect effects are computed in this
environment (its transformers version) with the eager attention kernel fvkit
uses, and the exact ones again with the ``sdpa`` kernel; each is compared with
the reference's numbers. Printed per row: the largest |reference IE|, the
largest absolute drift of each variant, and the largest clean probability of a
target token (the scale of float32 rounding in the probabilities the IE is a
difference of). Run it under each transformers version to size
``fvkit.parity.tolerances.IE_ABS_FLOOR``; raw rows go to
``benchmarks/results/ie_noise_floor_<transformers version>.json``.

The kernel is switched on the loaded model (``config._attn_implementation``).
Under transformers 4.49 GPT-2 and GPT-J choose their attention class when the
model is built, so the switch only changes how their causal mask is prepared
and their ``sdpa`` numbers there are not a kernel comparison (the drift is the
size of the effects); every other model reads the setting on each call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOTS = ROOT / "parity_tests/__snapshots__/test_m3_indirect_effect"


def snapshot_rows(model: str) -> list:
    return sorted(SNAPSHOTS.glob(f"test_indirect_effect[[]{model}[]][[]*].json"))


def clean_target_prob_max(lm, dataset, trials, n: int) -> float:
    """Largest clean probability of a trial's target token (the scale of the IE's rounding)."""
    from fvkit.method.indirect_effect import TrialSetup
    from fvkit.method.prompts import DEFAULT_TEMPLATE
    from fvkit.method.token_labels import dummy_token_labels
    dummy = dummy_token_labels(trials.n_shots, lm.tokenizer, lm.spec.prepend_bos, lm.spec.bos_text, DEFAULT_TEMPLATE)
    best = 0.0
    for i in range(n):
        setup = TrialSetup.build(lm, dataset, trials, i, dummy, DEFAULT_TEMPLATE)
        with torch.no_grad():
            logits = lm.model(**setup.inputs).logits[0, -1]
        best = max(best, float(torch.softmax(logits, -1)[setup.target_id]))
    return best


def main(argv=None) -> int:
    from fvkit.method.activations import mean_head_activations
    from fvkit.method.data import load_task_dataset
    from fvkit.method.fixed_trials import FixedTrials
    from fvkit.models.loader import load_model
    from fvkit.models.zoo import DEFAULT_PARITY_MODELS
    from fvkit.pipeline import indirect_effects

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_PARITY_MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    ds = load_task_dataset("antonym", str(ROOT / "datasets"))
    trials = FixedTrials.load(str(ROOT / "datasets/fixed_trials/fixed_trials_antonym_t10_s10_seed0.json"), ds)
    rows = []
    for model in args.models:
        lm = load_model(model, device="cpu", dtype="fp32", quant="none", parity=True)
        for path in snapshot_rows(model):
            stored = json.loads(path.read_text())
            ref = torch.tensor(stored["value"]["indirect_effect"], dtype=torch.float64)
            n = ref.shape[0]
            mean_acts = mean_head_activations(lm, ds, trials, max_trials=n, show_progress=False)
            row = {"model": model, "key": stored["key"], "transformers": transformers.__version__,
                   "ref_max_abs": float(ref.abs().max()),
                   "clean_target_prob_max": clean_target_prob_max(lm, ds, trials, n)}
            for name, mode, kernel in (("exact", "exact", "eager"), ("fast", "fast", "eager"),
                                       ("exact_sdpa", "exact", "sdpa")):
                lm.model.config._attn_implementation = kernel
                ie = indirect_effects(lm, ds, trials, mean_acts, max_trials=n, mode=mode, show_progress=False)
                row[f"abs_drift_{name}"] = float((ie.double() - ref).abs().max())
            lm.model.config._attn_implementation = "eager"
            rows.append(row)
            print(f"{model:14s} {stored['key'][-14:]:>14s} |ref|max {row['ref_max_abs']:.2e} "
                  f"p_max {row['clean_target_prob_max']:.2e}  drift exact {row['abs_drift_exact']:.2e} "
                  f"fast {row['abs_drift_fast']:.2e} sdpa {row['abs_drift_exact_sdpa']:.2e}", flush=True)
    out = ROOT / f"benchmarks/results/ie_noise_floor_{transformers.__version__}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
