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

#: float32's resolution of a probability: the spacing of float32 numbers at 1.0
#: (2**-23 = 1.19e-7). An indirect effect is a difference of two such
#: probabilities; when the largest |IE| of a run lies below this, the effects are
#: made of rounding-scale differences (the random tiny models give 3e-9..7e-8 on
#: one trial) and IE_REL_TOL of them asks for agreement finer than float32 holds.
FLOAT32_PROB_RESOLUTION = 2.0 ** -23

#: Indirect effects (M3): an absolute drift that always passes, so that below
#: FLOAT32_PROB_RESOLUTION the gate compares at the noise level the computation
#: has, not at a relative tolerance that shrinks with the effects. Chosen as
#: IE_REL_TOL of FLOAT32_PROB_RESOLUTION (1.19e-12), so the floor takes over
#: exactly where the largest |IE| drops below that resolution, and the relative
#: tolerance still decides above it. Measured with
#: benchmarks/noise_floor/measure_ie_drift.py against the reference's snapshots
#: (made under transformers 4.49.0), on the four tiny models whose largest |IE| on
#: one trial lies below the resolution (tiny-gpt2, -neox, -gemma, -mistral:
#: 2.8e-9..6.7e-8): fvkit's largest absolute drift is 2.6e-13 under 4.49.0 (fast
#: mode; exact 0) and 3.1e-13 under 5.24.0 (exact, fast, and the sdpa attention
#: kernel in place of fvkit's eager one). Relative to those stages' largest |IE|
#: that is up to 9.9e-6 (tiny-gemma, sdpa), a hair under IE_REL_TOL: noise the
#: relative tolerance only just admits. The floor holds it with 4x to spare,
#: while an effect of 3e-9 computed wrong (a wrong head, slot or sign moves it by
#: its own size) exceeds it 2500 times.
IE_ABS_FLOOR = IE_REL_TOL * FLOAT32_PROB_RESOLUTION

#: Absolute floors by the relative tolerance they back up (fvkit.parity.drift.tensor_drift).
ABS_FLOORS = {"IE_REL_TOL": "IE_ABS_FLOOR"}

#: Function vector (M4), relative to its largest |entry|: a sum of out-projected
#: mean activations, so it inherits MEAN_ACT_REL_TOL's noise floor.
FV_REL_TOL = 1e-5

#: Top-head scores are rounded to 4 decimals by both sides; a drift far below the
#: tolerances above can still flip the last rounded digit, so scores may differ by
#: one unit of the 4th decimal. Heads themselves (layer, head) must be identical.
TOP_HEAD_SCORE_ABS_TOL = 1e-4 + 1e-12

#: Rank lists (M4) are compared exactly, except where the logits show a tie: both
#: fvkit's rank and the reference's must be places the target can take when the
#: logits within this fraction of the item's largest |logit| of the target's own
#: are ordered either way (fvkit.parity.rank_ties.tie_ranks). A function vector
#: within FV_REL_TOL moves logits by about that fraction, so closer neighbours
#: may legitimately swap.
RANK_TIE_REL_TOL = 1e-5

#: Decoded function vector (M4): fvkit's vocabulary logits of the vector against
#: the model's own forward pass with the vector as its last hidden state
#: (fvkit.parity.vocab_check), relative to their largest |logit|. Both apply the
#: same final norm and output head in float32, on one row shaped differently:
#: rounding of a few ulps at most (measured: 0, bit for bit, on every tiny zoo
#: model under transformers 5.24). A skipped or wrong norm moves the logits by
#: their own size.
VOCAB_LOGITS_REL_TOL = 1e-5

#: Injection guard (M4): adding the function vector must move the intervened
#: logits by more than float32 rounding noise of a single forward pass, or the
#: edit never reached the model (a hook on a path that did not fire, an edit
#: returned into a discarded tuple, ...).
MIN_INJECTION_LOGIT_CHANGE = 1e-6

#: Every tolerance by name, for the report.
TOLERANCES = {
    "MEAN_ACT_REL_TOL": MEAN_ACT_REL_TOL,
    "IE_REL_TOL": IE_REL_TOL,
    "IE_ABS_FLOOR": IE_ABS_FLOOR,
    "FV_REL_TOL": FV_REL_TOL,
    "TOP_HEAD_SCORE_ABS_TOL": TOP_HEAD_SCORE_ABS_TOL,
    "RANK_TIE_REL_TOL": RANK_TIE_REL_TOL,
    "VOCAB_LOGITS_REL_TOL": VOCAB_LOGITS_REL_TOL,
    "MIN_INJECTION_LOGIT_CHANGE": MIN_INJECTION_LOGIT_CHANGE,
}
