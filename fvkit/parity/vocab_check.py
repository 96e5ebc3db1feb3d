"""Gate M4's check of the function vector's decoded words against the model's own forward pass.

    failures, row = decoding_check(lm, result.function_vector)

fvkit decodes a function vector (:func:`fvkit.report.vocab.vector_logits`) by
reading it as the last hidden state: the final norm, then the output head, as
the reference's ``fv_to_vocab`` does (``Sequential(norm, lm_head, softmax)``).
The reference snapshots hold no decoded words, so the check asks the model
itself: the vector is put in place of the last decoder block's output at the
last position of a one-token forward pass, and the model's own ``forward``
applies whatever follows its blocks (final norm, output head, any logit
soft-capping). fvkit's logits must match those within VOCAB_LOGITS_REL_TOL, and
its top words must be the model's. A decoding that skips the norm, or applies
the wrong one, moves every logit by its own size.
"""

from __future__ import annotations

import torch

from fvkit.models import adapters
from fvkit.models.tracer import Trace, first_tensor, replace_first_tensor
from fvkit.parity.drift import tensor_drift
from fvkit.parity.records import StageRow
from fvkit.parity.tolerances import VOCAB_LOGITS_REL_TOL
from fvkit.report import vocab

STAGE = "vector_vocabulary"
#: Decoded words compared (the page shows ten).
TOP_WORDS = 10


def forward_logits(lm, fv: torch.Tensor) -> torch.Tensor:
    """The model's own logits (vocab,) with ``fv`` as the last block's output at the last position."""
    model, spec = lm.model, lm.spec
    last = lm.dims.n_layers - 1
    token = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else 0
    param = next(model.parameters())
    vec = fv.reshape(1, -1).to(device=param.device, dtype=param.dtype)

    def replace(output):
        hidden = first_tensor(output).clone()
        hidden[:, -1] = vec
        return replace_first_tensor(output, hidden)

    ids = torch.tensor([[token]], device=param.device)
    with torch.no_grad(), Trace(model, adapters.block_name(spec, last), retain_output=False, edit_output=replace):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
    return logits.float()


def decoding_check(lm, fv: torch.Tensor) -> tuple:
    """([failures], the stage row) of fvkit's decoding of ``fv`` against the model's forward pass."""
    ours = vocab.vector_logits(lm, fv).reshape(-1)
    theirs = forward_logits(lm, fv)
    drift = tensor_drift(STAGE, ours, theirs, VOCAB_LOGITS_REL_TOL, "VOCAB_LOGITS_REL_TOL",
                         source="the model's forward pass")
    k = min(TOP_WORDS, theirs.numel())
    mine, model_top = torch.topk(ours, k).indices.tolist(), torch.topk(theirs, k).indices.tolist()
    words = [lm.tokenizer.decode([i]) for i in model_top]
    failures = []
    if not drift.ok:
        failures.append(f"{STAGE}: fvkit's decoding of the function vector (fvkit.report.vocab) is not the "
                        f"model's own: {drift.message()}; fvkit's top words "
                        f"{[lm.tokenizer.decode([i]) for i in mine]} vs the model's {words}")
    row = drift.stage_row()
    row.detail = (row.detail + "; " if row.detail else "") + (
        f"top {k} words {'match' if drift.ok else 'differ from'} the model's forward pass: {words[:5]}")
    return failures, row
