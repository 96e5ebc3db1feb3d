"""Each model's reference release, stages the reference cannot compute, and an injected vector.

No reference checkout is needed: gates are fed sources directly, as in
test_parity_missing_stages.py.
"""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fvkit.errors import FvkitError, SpecError
from fvkit.models.architectures import get_architecture, reference_release
from fvkit.parity.gate_runner import GateContext, Gate, Source
from fvkit.parity.injected_vector import describe_vector
from fvkit.parity.options import ParityOptions
from fvkit.parity.records import Comparison, NOT_COMPARED
from fvkit.parity.reference_release import (ReferenceReleaseError, check_update_release, release_mismatch, release_of,
                                            tox_env)
from fvkit.parity.report import GateOutcome, ReportState
from fvkit.parity.session import ParitySession
from fvkit.report.page import render_html

REPO = Path(__file__).resolve().parents[1]
FV = [0.5, -1.0, 2.0, 0.25]


def m4(**values) -> dict:
    """An M4 part whose stages are all present, with the values given."""
    ev = {"clean_rank_list": [1, 2], "clean_topk": [[1, 0.5]], "intervention_rank_list": [0, 3],
          "intervention_topk": [[1, 0.5]]}
    part = {"top_heads": [[0, 1, 0.1]], "function_vector": [FV], "zero_shot": dict(ev), "shuffled": dict(ev),
            "baseline": {"clean_rank_list": [1, 2], "clean_topk": [[1, 0.5]]}}
    part.update(values)
    return part


class Shipped:
    def __init__(self):
        self.findings = []

    def add(self, **data):
        self.findings.append(data)


def run_gate(source: Source, ours: dict, release="4.49.0"):
    recorder = Shipped()
    ctx = GateContext(model="tiny", settings=SimpleNamespace(key="k", as_dict=lambda: {}), live=None, snapshot=None,
                      update=False, recorder=recorder, reference_release=release)
    gate = Gate("M4", ctx)
    gate.found, gate.missing = [source], []
    return gate, recorder


# --- the release of each model --------------------------------------------------------------

def test_every_current_model_declares_the_references_pin():
    assert release_of("tiny-llama") == release_of("smollm2-135m") == release_of("tiny-gemma-hd") == "4.49.0"
    assert reference_release("a-spec-written-for-one-run") == "4.49.0"
    assert release_of("some/hub-model", "gemma") == get_architecture("gemma").reference_transformers
    assert tox_env("4.49.0") == "reference-tf449" and tox_env("4.53.3") == "reference-tf453"


def test_an_architecture_with_a_malformed_release_is_refused():
    arch = dataclasses.replace(get_architecture("llama"), reference_transformers="4.53")
    with pytest.raises(SpecError, match="reference_transformers='4.53'.*exact transformers release"):
        arch.validate("fvkit/models/architectures/llama.py")


def test_snapshots_are_written_only_under_the_models_own_release():
    check_update_release("tiny-llama", "4.49.0", installed="4.49.0")
    with pytest.raises(ReferenceReleaseError) as err:
        check_update_release("gemma3-270m", "4.53.3", installed="4.49.0")
    text = str(err.value)
    assert "transformers 4.53.3" in text and "has 4.49.0" in text and "tox -e reference-tf453" in text


def test_session_refuses_snapshot_update_for_a_model_of_another_release(monkeypatch):
    import transformers

    options = ParityOptions(data_dir=REPO / "datasets", models=["tiny-llama"], update_snapshots=True,
                            reference_src=REPO)
    monkeypatch.setattr(transformers, "__version__", "4.49.0")
    ParitySession.create(options, REPO)
    monkeypatch.setattr(transformers, "__version__", "4.53.3")
    with pytest.raises(FvkitError, match="tiny-llama's reference numbers come from transformers 4.49.0"):
        ParitySession.create(options, REPO)


def test_reference_release_option_keeps_that_releases_models(monkeypatch):
    from fvkit.parity import session as session_module

    monkeypatch.setattr(session_module.ParitySession, "reference_release",
                        lambda self, name: "4.53.3" if name == "tiny-gemma" else "4.49.0")
    ps = ParitySession.create(ParityOptions(data_dir=REPO / "datasets", models=["tiny-llama", "tiny-gemma"],
                                            reference_release="4.53.3"), REPO)
    assert ps.model_names == ["tiny-gemma"]
    assert "left out tiny-llama (reference release 4.49.0)" in ps.notes[-1]
    # An environment whose release no requested model declares has nothing to do, and says so.
    empty = ParitySession.create(ParityOptions(data_dir=REPO / "datasets", models=["tiny-llama"],
                                               reference_release="4.53.3"), REPO)
    assert empty.model_names == [] and "none of tiny-llama has its reference numbers from" in empty.notes[-1]


def test_a_snapshot_from_another_release_fails_the_gate():
    gate, recorder = run_gate(Source("snapshot", m4(), made_under="4.49.0"), m4(), release="4.53.3")
    with pytest.raises(pytest.fail.Exception, match=r"made under transformers 4\.49\.0, but tiny's reference numbers "
                                                    r"come from transformers 4\.53\.3.*tox -e reference-tf453"):
        gate.check(m4())
    gate, _ = run_gate(Source("snapshot", m4(), made_under="4.53.3"), m4(), release="4.53.3")
    gate.check(m4())
    assert release_mismatch("tiny", "4.49.0", None) is None


# --- stages the reference cannot compute -------------------------------------------------------

def injected_source(vector=FV) -> Source:
    """What the runner reports on a head-split mismatch: no vector of its own, fvkit's evaluated."""
    why = "reference cannot compute: compute_function_vector needs n_heads*head_dim = hidden_size"
    part = m4()
    del part["function_vector"]
    return Source("snapshot", part, unsupported={"function_vector": why},
                  injected=describe_vector(torch.tensor(vector), why, ["zero_shot", "shuffled"]), made_under="4.49.0")


def test_a_stage_the_reference_cannot_compute_is_reported_as_such_and_the_rest_compared():
    gate, recorder = run_gate(injected_source(), m4())
    gate.check(m4())
    rows = {r.stage: r for r in recorder.findings[-1]["stage_rows"]}
    assert rows["function_vector"].status == NOT_COMPARED
    assert rows["function_vector"].detail.startswith("reference cannot compute: compute_function_vector")
    assert {s for s, r in rows.items() if r.status == "PASS"} == {"top_heads", "zero_shot", "shuffled", "baseline"}
    check = gate.checks[0]
    assert "function_vector" not in check.compared and "function_vector" in check.not_compared
    assert any("evaluated fvkit's function vector" in n for n in check.notes)


def test_a_changed_fvkit_vector_fails_against_the_references_evaluation_of_the_old_one():
    changed = [v * 1.001 for v in FV]
    gate, _ = run_gate(injected_source(), m4())
    with pytest.raises(pytest.fail.Exception, match="not the one the reference evaluated"):
        gate.check(m4(function_vector=[changed]))
    # The layer sweep's part holds no vector: the caller passes fvkit's.
    gate, _ = run_gate(injected_source(), m4())
    with pytest.raises(pytest.fail.Exception, match="not the one the reference evaluated"):
        gate.check(m4(), vector=[changed])


def test_report_lists_what_was_compared_and_what_the_reference_cannot_compute():
    check = Comparison("M4", "snapshot", compared=["top_heads", "zero_shot"],
                       not_compared={"function_vector": "reference cannot compute: widths differ"})
    state = ReportState(".", environment={}, writer=False)
    state.bind("antonym", "t", {"models": ["tiny-gemma-hd"]})
    outcome = GateOutcome("x::m4", "tiny-gemma-hd", "M4", "test_function_vector", "PASS",
                          comparisons={"M4": {"snapshot": check}},
                          stage_rows=check.stage_rows(("top_heads", "zero_shot")))
    from fvkit.parity.records import Findings
    state.record(outcome, Findings(reference={"reference_transformers": "4.49.0"}))
    rows = state.stage_rows()
    assert [(r.stage, r.status) for r in rows] == [("top_heads", "PASS"), ("zero_shot", "PASS"),
                                                   ("function_vector", NOT_COMPARED)]
    assert {r.reference_transformers for r in rows} == {"4.49.0"}
    log = "\n".join(state._log_lines)
    assert "tiny-gemma-hd: reference numbers from transformers 4.49.0" in log
    assert "compared with the snapshot: top_heads, zero_shot" in log
    assert "NOT COMPARED function_vector: reference cannot compute: widths differ" in log
    report = state.as_dict()
    assert report["models"]["tiny-gemma-hd"]["reference"]["reference_transformers"] == "4.49.0"
    page = render_html(report)
    assert "NOT COMPARED: reference cannot compute: widths differ" in page
    assert "come from transformers 4.49.0" in page
