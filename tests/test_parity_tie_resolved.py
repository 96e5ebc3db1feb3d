"""A rank taken from the reference at a float tie is written as tie-resolved, with the count,
in the stages CSV, the log and the page (fvkit.parity.records, gate_runner, report, report.page)."""

from types import SimpleNamespace

from fvkit.parity.gate_runner import Gate, GateContext, Source
from fvkit.parity.records import Comparison, GateOutcome
from fvkit.parity.registry import gate_def
from fvkit.parity.report import log_entry
from fvkit.report.page import _exact_table


def evaluation(ranks):
    return {"clean_rank_list": [0, 1], "intervention_rank_list": list(ranks), "clean_topk": [[1, 0.5]],
            "intervention_topk": [[1, sum(r < 1 for r in ranks) / len(ranks)]]}


def m4(ranks):
    return {"top_heads": [[0, 0, 0.5]], "function_vector": [[1.0, 2.0]], "zero_shot": evaluation(ranks),
            "shuffled": evaluation([0, 0]), "baseline": {"clean_rank_list": [0, 1], "clean_topk": [[1, 0.5]]}}


class Shipped:
    def __init__(self):
        self.findings = []

    def add(self, **data):
        self.findings.append(data)


def ties_as_the_rank_tie_check_reports_them(ours, ref):
    """What resolve_rank_ties returns when fvkit's logits show both differing ranks to be float ties."""
    fixed = {**ours, "zero_shot": dict(ref["zero_shot"])}
    ties = [{"stage": "zero_shot", "list": "intervention_rank_list", "item": i, "fvkit_rank": a,
             "reference_rank": b, "relative_logit_gap": 1e-9}
            for i, (a, b) in enumerate(zip(ours["zero_shot"]["intervention_rank_list"],
                                           ref["zero_shot"]["intervention_rank_list"])) if a != b]
    return fixed, ties


def checked_with_ties() -> tuple:
    recorder = Shipped()
    ctx = GateContext(model="tiny", settings=SimpleNamespace(key="k", as_dict=lambda: {}), live=None, snapshot=None,
                      update=False, recorder=recorder)
    gate = Gate("M4", ctx)
    gate.found, gate.missing = [Source("snapshot", m4([4, 7]))], []
    gate.check(m4([5, 6]), adjust=ties_as_the_rank_tie_check_reports_them)
    return gate, recorder.findings[-1]


def test_the_csv_row_says_tie_resolved_with_the_count_not_exact_match():
    _, shipped = checked_with_ties()
    rows = {r.stage: r for r in shipped["stage_rows"]}
    assert rows["zero_shot"].status == "PASS"
    assert rows["zero_shot"].detail.startswith("tie-resolved: 2 rank(s) taken from the reference")
    assert rows["shuffled"].detail == "exact match"


def test_the_count_survives_the_report_json():
    _, shipped = checked_with_ties()
    check = shipped["comparisons"]["M4"]["snapshot"]
    back = Comparison.from_dict("M4", check.as_dict())
    assert back.tie_resolved == {"zero_shot": 2} and back.tie_count == 2


def test_the_log_line_and_the_page_say_tie_resolved_with_the_count():
    _, shipped = checked_with_ties()
    outcome = GateOutcome("t::test_function_vector[tiny]", "tiny", "M4", "test_function_vector",
                          comparisons=shipped["comparisons"])
    assert "tie-resolved: 2 rank(s)" in log_entry(outcome)
    report = {"models": {"tiny": {"gates": {"M4": {"tests": [outcome.as_dict()]}}}}}
    page = _exact_table(report)
    assert "tie-resolved: 2 rank(s)" in page and ">identical<" not in page


def test_no_tie_no_tie_wording():
    check = Comparison("M4", "snapshot", compared=["zero_shot"])
    rows = check.stage_rows(gate_def("M4").exact_stages_of(("zero_shot",)))
    assert [r.detail for r in rows] == ["exact match"]
