"""Named tolerances of the parity gates, each with the reason for its value.

    from fvkit.parity.tolerances import MEAN_ACT_REL_TOL, TOLERANCES

Relative tolerances scale the largest absolute drift by the largest absolute
reference entry (:func:`fvkit.parity.drift.tensor_drift`); which gate applies
which tolerance is in :mod:`fvkit.parity.registry`. Plain constants only, so
the report can list them without importing torch.
"""

#: Mean head activations (M2). Both sides run the same float32 forward pass on
#: CPU; what is left is summation-order noise, a few float32 ulps (~1e-7) of the
#: largest activation. 1e-5 leaves two orders of margin over that noise, while a
#: 1e-3 change of one weight (the perturbed-model check) moves it ~1e-4.
MEAN_ACT_REL_TOL = 1e-5

#: Indirect effects (M3), relative to the largest |IE|. The IE is a difference of
#: two softmax probabilities averaged over trials, so its noise floor is that of
#: float32 probabilities (~1e-7); same margin argument as MEAN_ACT_REL_TOL.
IE_REL_TOL = 1e-5

#: Function vector (M4), relative to its largest |entry|: a sum of out-projected
#: mean activations, so it inherits MEAN_ACT_REL_TOL's noise floor.
FV_REL_TOL = 1e-5

#: Top-head scores are rounded to 4 decimals by both sides; a drift far below the
#: tolerances above can still flip the last rounded digit, so scores may differ by
#: one unit of the 4th decimal. Heads themselves (layer, head) must be identical.
TOP_HEAD_SCORE_ABS_TOL = 1e-4 + 1e-12

#: Rank lists (M4) are compared exactly, except where fvkit's own logits show a
#: tie: the logit at the reference's rank within this fraction of the item's
#: largest |logit| of the target's logit. A function vector within FV_REL_TOL moves
#: logits by about that fraction, so closer neighbours may legitimately swap.
RANK_TIE_REL_TOL = 1e-5

#: Injection guard (M4): adding the function vector must move the intervened
#: logits by more than float32 rounding noise of a single forward pass, or the
#: edit never reached the model (a hook on a path that did not fire, an edit
#: returned into a discarded tuple, ...).
MIN_INJECTION_LOGIT_CHANGE = 1e-6

#: Every tolerance by name, for the report.
TOLERANCES = {
    "MEAN_ACT_REL_TOL": MEAN_ACT_REL_TOL,
    "IE_REL_TOL": IE_REL_TOL,
    "FV_REL_TOL": FV_REL_TOL,
    "TOP_HEAD_SCORE_ABS_TOL": TOP_HEAD_SCORE_ABS_TOL,
    "RANK_TIE_REL_TOL": RANK_TIE_REL_TOL,
    "MIN_INJECTION_LOGIT_CHANGE": MIN_INJECTION_LOGIT_CHANGE,
}
