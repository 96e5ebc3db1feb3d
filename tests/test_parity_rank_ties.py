"""Rank differences accepted only as float ties (fvkit.parity.rank_ties)."""

import torch

from fvkit.parity.compare import compare_gate
from fvkit.parity.rank_ties import resolve_rank_ties, tie_gap

# Target token 0 ranks 2nd (rank 1); token 2 ranks 3rd, within 1e-7 of it; token 3 far below.
LOGITS = torch.tensor([5.0, 9.0, 5.0 - 1e-7, 1.0])


def logits_of(stage, kind, item):
    return LOGITS, 0


def part(rank):
    """An evaluation with two items; item 0's intervened rank is ``rank``."""
    topk = [[k, sum(r < k for r in (rank, 0)) / 2] for k in (1, 2, 3)]
    return {"zero_shot": {"clean_rank_list": [0, 1], "intervention_rank_list": [rank, 0],
                          "clean_topk": [[1, 0.5], [2, 1.0], [3, 1.0]], "intervention_topk": topk}}


def test_a_rank_that_differs_by_a_float_tie_is_accepted_and_reported():
    ours, ref = part(1), part(2)
    adjusted, ties = resolve_rank_ties(ours, ref, logits_of)
    assert ties == [{"stage": "zero_shot", "list": "intervention_rank_list", "item": 0, "fvkit_rank": 1,
                     "reference_rank": 2, "relative_logit_gap": tie_gap(LOGITS, 0, 2)}]
    assert adjusted["zero_shot"]["intervention_rank_list"] == [2, 0]
    assert adjusted["zero_shot"]["intervention_topk"] == ref["zero_shot"]["intervention_topk"]
    assert compare_gate("M4", adjusted, ref, "snapshot").ok
    assert ours["zero_shot"]["intervention_rank_list"] == [1, 0]  # the input is left alone


def test_a_rank_that_differs_by_more_than_a_tie_still_fails():
    ours, ref = part(1), part(3)
    adjusted, ties = resolve_rank_ties(ours, ref, logits_of)
    assert ties == [] and adjusted["zero_shot"]["intervention_rank_list"] == [1, 0]
    assert not compare_gate("M4", adjusted, ref, "snapshot").ok


def test_a_rank_fvkit_cannot_reproduce_is_never_explained_away():
    ours, ref = part(3), part(2)  # fvkit claims rank 3, but its logits give rank 1
    adjusted, ties = resolve_rank_ties(ours, ref, logits_of)
    assert ties == [] and adjusted["zero_shot"]["intervention_rank_list"] == [3, 0]


def test_sweep_ties_are_resolved_with_each_layers_own_logits():
    from fvkit.parity.rank_ties import resolve_sweep_ties

    asked = []

    def logits_at(layer):
        asked.append(layer)
        return logits_of

    ours = {"layer_sweep": {"zero_shot": [part(1)["zero_shot"], part(1)["zero_shot"], part(1)["zero_shot"]]}}
    ref = {"layer_sweep": {"zero_shot": [part(1)["zero_shot"], part(2)["zero_shot"], part(3)["zero_shot"]]}}
    adjusted, ties = resolve_sweep_ties(ours, ref, logits_at)
    assert asked == [1, 2]  # only layers that differ are recomputed
    assert [t["stage"] for t in ties] == ["layer_sweep.zero_shot[layer 1]"]
    check = compare_gate("M4", adjusted, ref, "snapshot")
    assert [m.path for m in check.mismatches] == ["layer_sweep.zero_shot[layer 2].intervention_rank_list[0]"]


def test_a_wrong_rank_function_cannot_vouch_for_its_ranks(monkeypatch):
    """A rank counted from the least likely token (the mutation harness's rank_ascending, which
    rebinds every name of fvkit's rank function): the reference's rank is the target's true
    place, so the gap at the reference's rank alone is 0; fvkit's rank lies far outside the
    target's block of tied logits and must still fail."""
    import fvkit.method.intervene as intervene
    import fvkit.parity.rank_ties as rank_ties
    from fvkit.parity.rank_ties import tie_ranks

    def ascending_rank(logits, target_id):
        return torch.where(torch.argsort(logits.squeeze(), descending=False) == target_id)[0].item()

    monkeypatch.setattr(intervene, "token_rank", ascending_rank)
    monkeypatch.setattr(rank_ties, "token_rank", ascending_rank, raising=False)
    logits = torch.linspace(10.0, -10.0, 100)  # token i ranks i-th, no ties

    def wrong(stage, kind, item):
        return logits, 10

    ascending = int(torch.where(torch.argsort(logits, descending=False) == 10)[0])
    assert ascending == 89 and tie_ranks(logits, 10) == range(10, 11)
    ours, ref = part(ascending), part(10)
    adjusted, ties = resolve_rank_ties(ours, ref, wrong)
    assert ties == [] and not compare_gate("M4", adjusted, ref, "snapshot").ok


def test_tie_ranks_spans_every_logit_within_the_tolerance_of_the_target():
    from fvkit.parity.rank_ties import tie_ranks

    assert tie_ranks(LOGITS, 0) == range(1, 3)      # 5.0 and 5.0 - 1e-7 may come in either order
    assert tie_ranks(LOGITS, 1) == range(0, 1)      # the clear maximum
    assert tie_ranks(torch.tensor([2.0, 2.0, 2.0, 1.0]), 2) == range(0, 3)
