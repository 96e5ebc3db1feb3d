"""Gate M5: every registered ModelSpec resolves and hooks a real model; the reduced run works.

    pytest -k spec_resolution            # one test per registered spec

Each spec runs on the --model models it serves, else on its zoo model (a spec
whose only zoo model is a real checkpoint that is not installed, or that the
installed transformers release cannot build, is skipped with the reason). Checks: every layer's block, attention and out-projection resolve
with the widths the config implies; one forward pass fires each hook once with
the expected shapes; adding a random vector of the residual stream's norm at a
block moves the last logits by at least MIN_INJECTION_LOGIT_CHANGE and adding
zero does not move them at all; the tokenizer adds BOS exactly when the spec
says it does (as `fvkit resolve` and `fvkit run` check). For a --model, the
reduced end-to-end run (one trial; a real checkpoint's session run) must finish and write
every stage file.
"""

import pytest

from fvkit.models import zoo
from fvkit.errors import FvkitError, UnsupportedReleaseError
from fvkit.parity.spec_smoke import (MIN_INJECTION_LOGIT_CHANGE, bos_policy_smoke, forward_hook_smoke,
                                     resolve_spec_paths)
from fvkit.parity.gate_runner import Recorder
from fvkit.parity.records import StageRow
from fvkit.pipeline import RUN_FILES, run_pipeline, write_run_outputs

pytestmark = pytest.mark.fvkit_gate("M5")


def load_case_model(parity, case):
    entry = zoo.ZOO.get(case.model)
    try:
        return parity.model(case.model)
    except UnsupportedReleaseError as err:
        pytest.skip(f"spec '{case.spec}': {err}")
    except FvkitError as err:
        if entry is not None and entry.source != "random" and not case.selected:
            pytest.skip(f"spec '{case.spec}': its real model {case.model} is not available here: {err}")
        raise


def reduced_run(parity, name: str, out_dir):
    """The end-to-end run on one trial; reuses the session's result when it already is one, and
    on a real checkpoint, whose session run is already reduced (a few trials) and another one
    would cost minutes for nothing more that M5 checks."""
    settings = parity.settings_for(name)
    if settings.n_trials_used == 1 or not parity.is_tiny(name):
        result, used = parity.pipeline(name), settings.n_trials_used
    else:
        result, used = run_pipeline(parity.model(name), parity.dataset, parity.trials,
                                    n_top_heads=settings.n_top_heads, edit_layer=settings.edit_layer, max_trials=1,
                                    show_progress=False), 1
    return result, write_run_outputs(result, out_dir, extra_args={"max_trials": used, "source": "parity M5"})


def test_spec_resolution(spec_case, parity, request):
    if spec_case.skip:
        pytest.skip(spec_case.skip)
    recorder = Recorder(request.node)
    lm = load_case_model(parity, spec_case)
    assert lm.spec.name == spec_case.spec, (
        f"{spec_case.model} resolved to spec '{lm.spec.name}', expected '{spec_case.spec}'")
    paths = resolve_spec_paths(lm)
    bos = bos_policy_smoke(lm)
    smoke = forward_hook_smoke(lm)
    metrics = {"spec": paths, "smoke": smoke, "bos_policy": bos}
    rows = [StageRow(stage="spec_resolution", status="PASS", detail=f"{paths['n_layers']} layers resolved"),
            StageRow(stage="forward_hook_smoke", status="PASS",
                     detail=f"{smoke['hooks']} hooks fired once; a random vector of norm "
                            f"{smoke['injection_norm']:.3g} moved the last logits by "
                            f"{smoke['injection_logit_change']:.3g} (minimum {MIN_INJECTION_LOGIT_CHANGE:g})"),
            StageRow(stage="bos_policy", status="PASS",
                     detail="tokenizer adds BOS" if bos["prepend_bos"] else f"one-token bos_text {bos['bos_text']!r}")]
    if spec_case.selected:
        result, out = reduced_run(parity, spec_case.model, parity.run_dir(spec_case.model))
        missing = [f for f in RUN_FILES if not (out / f).is_file()]
        assert not missing, f"the reduced run on {spec_case.model} did not write {missing} in {out}"
        metrics["reduced_run"] = {"out_dir": str(out), "timings": result.timings}
        rows.append(StageRow(stage="reduced_run", status="PASS", seconds=sum(result.timings.values()),
                             detail=f"{len(RUN_FILES)} stage files in {out}"))
    recorder.add(metrics=metrics, stage_rows=rows)
