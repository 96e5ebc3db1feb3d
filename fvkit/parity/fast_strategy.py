"""Gate M3's check that fvkit's fast indirect effect ran its block replay, not the fallback.

    failures, row = fallback_check(lm)       # after the fast mode ran on lm
    gate.check(ours, guard_failures=failures)

The fast path's ``auto`` strategy replays the decoder blocks for the last
token and, when the replay's unpatched row does not reproduce the clean run's
logits, silently recomputes through the whole model
(:func:`fvkit.fast.indirect_effect.blocks_refusal`). That fallback gives the
right numbers, so a stale or misplaced row in fvkit's own replay would pass the
comparison with the reference unseen. In the parity suite the fallback is
therefore a failure that names the refusal: every model the suite runs has a
forward pass made of its blocks, final norm and output head, which the replay
must reproduce.
"""

from __future__ import annotations

from fvkit.fast.indirect_effect import blocks_refusal
from fvkit.parity.records import StageRow

STAGE = "fast_strategy"


def fallback_check(lm) -> tuple:
    """([failure] or [], the stage row) for the fast mode's strategy on ``lm``."""
    refusal = blocks_refusal(lm.model)
    if refusal is None:
        return [], StageRow(stage=STAGE, status="PASS",
                            detail="blocks replay reproduced the clean run's logits on every unpatched row")
    failure = (f"{STAGE}: fvkit's fast path gave up its blocks replay and fell back to the whole-model "
               f"strategy: {refusal}. The parity suite does not accept the fallback: the replay fed a "
               f"row that is not the clean run's (a stale or misplaced cache row in fvkit.fast), and the "
               f"fallback's numbers would hide it")
    return [failure], StageRow(stage=STAGE, status="FAIL", detail=f"fell back to the whole-model strategy: {refusal}")
