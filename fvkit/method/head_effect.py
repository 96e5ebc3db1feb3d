"""One head's indirect effect: the patch, the probability it is measured on, the difference.

    patch = head_patch(mean_acts, layer, slots, n_heads, head_dim, heads=[3])   # edit for EditInput
    with EditInput(o_proj, patch) as edit:
        logits = model(**inputs).logits[:, -1, :]
    check_patch_fired(edit, lm, layer)
    ie = effect(target_probs(logits, target_id), clean_probs)

The exact strategy (:mod:`fvkit.method.indirect_effect`, one forward pass per
head) and the fast one (:mod:`fvkit.fast.indirect_effect`, one batch row per
head on the cached prefix) both build their patches, probabilities and
differences here, so the two can only differ in how the logits are computed.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from fvkit.errors import FvkitError
from fvkit.models import adapters
from fvkit.models.placement import to_like


def head_patch(mean_acts: torch.Tensor, layer: int, slots: Sequence[int], n_heads: int, head_dim: int,
               heads: Optional[Sequence[int]] = None, first_row: int = 0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Edit of an out-projection input: batch row ``first_row + i`` gets head ``heads[i]``'s
    mean activation at the last token (all heads, in order, when ``heads`` is None).

    The input is copied, never changed in place: the caller's clean activations stay clean.
    """
    heads = torch.arange(n_heads) if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
    rows = torch.arange(len(heads)) + first_row

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        view = x.view(*x.shape[:-1], n_heads, head_dim)
        # The reference patches once per token labelled as the last one: with several
        # such slots, the last one wins. The mean activations stay on the CPU in float32;
        # the values go where the out-projection's input is (a GPU, half precision).
        for slot in slots:
            view[rows.to(x.device), -1, heads.to(x.device)] = to_like(mean_acts[layer, heads, slot], x)
        return x

    return fn


#: Logits further than this below a row's largest are raised to it before the softmax. Their
#: exponentials would otherwise fall below float32's smallest normal number (e**-87), where
#: the CPU's exp takes a slow path: 21 ms against 6.5 ms for 64 rows of 49k logits spread
#: over +-120 on one core, and a sixth of a fast indirect-effect trial on SmolLM2-135M.
#: Raised, each adds e**-80 (1.8e-35) to a sum of at least 1, far below its resolution:
#: every probability above 1e-30 is bit for bit the plain softmax's.
SOFTMAX_FLOOR = 80.0


def target_probs(logits: torch.Tensor, target_id: int, overwrite: bool = False) -> torch.Tensor:
    """Probability of the target answer's first token, from last-token logits (``(vocab,)`` or ``(rows, vocab)``).

    With ``overwrite`` the logits are raised to the floor in place (the same bits, without a copy
    of them: a caller that has no further use for its logits)."""
    floor = logits.amax(dim=-1, keepdim=True) - SOFTMAX_FLOOR
    raised = torch.maximum(logits, floor, out=logits) if overwrite else torch.maximum(logits, floor)
    return torch.softmax(raised, dim=-1)[..., target_id]


def effect(patched: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The indirect effect: how much the patch raised the target's probability (negative when it lowered it)."""
    return patched - clean


def check_patch_fired(edit, lm, layer: int) -> None:
    """A head patch must run exactly once per forward pass, or the effect measures nothing."""
    if edit.fired != 1:
        raise FvkitError(f"the patch on {adapters.out_proj_name(lm.spec, layer)} ran {edit.fired} times, expected once")
