"""Gate M3's check that fvkit's fast indirect effect ran its fast strategies, not a fallback.

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
must reproduce. The same holds one step earlier: ``auto`` first carries the rows
in the prompt's own pass (``merged``), and gives that up for the block replay
either because it cannot extend a model's blocks (GPT-2's, which take their mask
positionally: a pass, named in the row) or because the pass ran and did not
reproduce the clean run (:func:`~fvkit.fast.indirect_effect.merged_disagreement`:
a failure, for the same reason).
"""

from __future__ import annotations

from fvkit.fast.indirect_effect import blocks_refusal, merged_disagreement, merged_refusal
from fvkit.parity.records import StageRow

STAGE = "fast_strategy"


def _given_up(what: str, reason: str, hidden_by: str) -> str:
    return (f"{STAGE}: fvkit's fast path gave up {what}: {reason}. The parity suite does not accept the "
            f"fallback: {hidden_by}")


def fallback_check(lm) -> tuple:
    """([failure, ...] or [], the stage row) for the fast mode's strategy on ``lm``."""
    failures, details = [], []
    merged, disagreement, refusal = merged_refusal(lm.model), merged_disagreement(lm.model), blocks_refusal(lm.model)
    if disagreement is not None:
        failures.append(_given_up("carrying the rows in the prompt's pass (merged), which did not reproduce the "
                                  "clean run", disagreement, "the merged pass misplaced a row or a position, and "
                                  "the block replay's numbers would hide it"))
        details.append(f"merged pass disagreed: {disagreement}")
    elif merged is not None:
        details.append(f"merged pass not used: {merged}")
    if refusal is not None:
        failures.append(_given_up("its blocks replay and fell back to the whole-model strategy", refusal,
                                  "the replay fed a row that is not the clean run's (a stale or misplaced cache "
                                  "row in fvkit.fast), and the fallback's numbers would hide it"))
        details.append(f"fell back to the whole-model strategy: {refusal}")
    if failures:
        return failures, StageRow(stage=STAGE, status="FAIL", detail="; ".join(details))
    used = "blocks replay" if merged is not None else "merged pass"
    return [], StageRow(stage=STAGE, status="PASS",
                        detail="; ".join([f"{used} reproduced the clean run's logits on every unpatched row"] + details))
