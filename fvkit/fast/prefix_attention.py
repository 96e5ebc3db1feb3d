"""Attention of replayed rows that all share one clean prefix, reading the prefix once.

    with SharedPrefixAttention(blocks, calls):      # inside BlockCalls.replaying()
        calls.call_block(blocks, 3, hidden)          # 3 rows: one product over the prefix for all of them

In a replay (:mod:`fvkit.fast.replay`) every batch row is one new token that
attends to the same clean prefix plus its own key. A model's eager attention is
handed keys and values already joined per row, then copies them once more per
query head (``repeat_kv``) and multiplies each row on its own: hundreds of rows
times the whole prefix, copied and read again, which was a third of a fast
indirect-effect trial. Here the rows' queries, grouped by key/value head, meet
the prefix in one matrix product per head group; each row's own new key and
value are added as the last score and the last term of the weighted sum. Rows
of several prompts in one batch (:mod:`fvkit.fast.forward_rows`) meet each
prompt's own prefix this way, part by part (:class:`JoinedRows`).

The same numbers up to float32 rounding: the products are the same dot products
in another shape, and the new token's term is added after the prefix's sum
instead of inside it. The replacement stands in for the ``eager_attention_forward``
of the blocks' modeling modules (the function an eager model calls with the
keys and values its cache returned) only while a replay runs, and only for the
keys and values the replay itself just joined; any other call goes to the
model's own function. Its first call for each attention module is computed both
ways and compared (:data:`CHECK_REL_TOL`); a module where they disagree, such as
an architecture whose eager attention does more than scale, cap, mask, softmax
and weight, keeps its own function from then on, with a warning.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from typing import NamedTuple

import torch

from fvkit.fast.relative_drift import relative_drift
from fvkit.models.tracer import ReplaceMethod

#: Name of the function replaced in a modeling module: what eager attention modules call
#: with the keys and values their cache returned (transformers 4.48 and later).
EAGER_FUNCTION = "eager_attention_forward"

#: The first call for each attention module must agree with the model's own function to
#: this fraction of the largest |output|. Rounding puts them 1e-7 apart (the same products
#: summed in another order); leaving out a scale, a cap, a mask or a head grouping moves
#: outputs by percents.
CHECK_REL_TOL = 1e-5

#: Precisions it runs in. In half precisions rounding alone moves outputs by 1e-3..1e-2,
#: so the first-call check could not tell a wrong implementation from rounding; in float64
#: eager functions differ in where they round (some take the softmax in float32, some
#: not), which this function cannot know. The model's own function runs there.
CHECKED_DTYPES = (torch.float32,)

#: Keyword arguments that change what attention computes and that this function does not
#: implement (attention sinks): a call carrying one goes to the model's own function.
UNSUPPORTED_KWARGS = ("s_aux", "sinks", "head_mask")

#: attention module -> True once checked, or the reason its own function is kept.
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def modeling_modules(blocks) -> list:
    """The Python modules that define the blocks' attention layers and an eager attention function."""
    found = []
    for block in blocks:
        for sub in block.modules():
            module = sys.modules.get(type(sub).__module__)
            if module is not None and callable(getattr(module, EAGER_FUNCTION, None)) and module not in found:
                found.append(module)
    return found


def shared_prefix_attention(query, prefix_k, prefix_v, new_k, new_v, mask, scaling: float, softcap=None):
    """Eager attention of ``R`` one-token rows on a prefix all rows share.

    ``query`` (R, H, 1, d); ``prefix_k``/``prefix_v`` (kv, P, d), one copy for all rows;
    ``new_k``/``new_v`` (R, kv, 1, d); ``mask`` broadcastable to (R, H, 1, P + 1) or None.
    Heads ``h * g .. h * g + g - 1`` share key/value head ``h`` (``repeat_kv``'s order).
    Returns (output (R, 1, H, d), weights (R, H, 1, P + 1)), as eager attention does.
    """
    n_rows, n_heads, _, dim = query.shape
    n_kv, n_prefix = prefix_k.shape[0], prefix_k.shape[1]
    group = n_heads // n_kv
    q = query.reshape(n_rows, n_kv, group, dim)
    q_by_kv = q.transpose(0, 1).reshape(n_kv, n_rows * group, dim)
    on_prefix = torch.bmm(q_by_kv, prefix_k.transpose(1, 2)).view(n_kv, n_rows, group, n_prefix).transpose(0, 1)
    on_self = torch.matmul(q, new_k.reshape(n_rows, n_kv, dim, 1))
    scores = torch.cat([on_prefix, on_self], dim=-1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(n_rows, n_heads, 1, n_prefix + 1)
    if mask is not None:
        scores = scores + mask[..., :n_prefix + 1]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    w = weights.view(n_rows, n_kv, group, n_prefix + 1)
    w_prefix = w[..., :n_prefix].transpose(0, 1).reshape(n_kv, n_rows * group, n_prefix)
    out = torch.bmm(w_prefix, prefix_v).view(n_kv, n_rows, group, dim).transpose(0, 1)
    out = out + w[..., n_prefix:] * new_v.reshape(n_rows, n_kv, 1, dim)
    return out.reshape(n_rows, n_heads, 1, dim).transpose(1, 2).contiguous(), weights


class PrefixPart(NamedTuple):
    """Rows ``start .. stop - 1`` of a batch, which share one prompt's prefix ``keys``/``values``
    (kv, P, d), placed from column ``first`` of the joined keys."""
    start: int
    stop: int
    keys: torch.Tensor
    values: torch.Tensor
    first: int


class JoinedRows:
    """One layer's keys and values as a replay's cache update returned them, and how they were built.

        joined = JoinedRows([PrefixPart(0, 8, prefix_k, prefix_v, 0)], new_k, new_v, n_columns=prefix_k.shape[1])
        keys, values = joined.materialize()      # (8, kv, P + 1, d) each: the prefix, then each row's own

    ``parts`` lists the groups of rows that share one prefix (:class:`PrefixPart`):
    rows of one prompt see its prefix in columns ``first .. first + P - 1`` of
    ``n_columns`` (prompts of
    several lengths are left-padded to the longest; the attention mask hides the
    padding) and their own key in column ``n_columns``. ``new_k``/``new_v`` are the
    rows' own (R, kv, 1, d). ``keys``/``values`` are what the update returned: the
    joined tensors themselves, or, where building them would cost more than the
    attention (many rows on several prefixes), free placeholders of their shape that
    :meth:`materialize` replaces wherever the model's own attention has to read them.
    """

    def __init__(self, parts, new_k, new_v, n_columns: int, keys=None, values=None):
        self.parts, self.new_k, self.new_v, self.n_columns = parts, new_k, new_v, n_columns
        shape = (new_k.shape[0], new_k.shape[1], n_columns + 1, new_k.shape[-1])
        self.placeholders = keys is None
        if keys is None:
            keys, values = new_k.new_zeros(()).expand(shape), new_v.new_zeros(()).expand(shape)
        self.keys, self.values = keys, values

    def materialize(self) -> tuple:
        """The joined (keys, values) as eager attention reads them, zeros where the mask hides padding."""
        if not self.placeholders:
            return self.keys, self.values
        return (self._join(self.new_k, [part.keys for part in self.parts]),
                self._join(self.new_v, [part.values for part in self.parts]))

    def _join(self, new: torch.Tensor, prefixes: list) -> torch.Tensor:
        joined = new.new_zeros(self.keys.shape)
        for part, prefix in zip(self.parts, prefixes):
            joined[part.start:part.stop, :, part.first:part.first + prefix.shape[1]] = prefix
        joined[:, :, self.n_columns:] = new
        return joined


def _part_mask(mask, start: int, stop: int, first: int, n_prefix: int, n_columns: int):
    """The mask columns of one part's rows: its prefix's columns, then the rows' own."""
    if mask is None:
        return None
    if mask.shape[0] > 1:
        mask = mask[start:stop]
    if first == 0 and n_prefix == n_columns:
        return mask[..., :n_prefix + 1]
    return torch.cat([mask[..., first:first + n_prefix], mask[..., n_columns:n_columns + 1]], dim=-1)


def joined_attention(joined: JoinedRows, query, mask, scaling: float, softcap=None):
    """:func:`shared_prefix_attention` for every part of ``joined``; (output, weights), the weights
    only where all rows share one prefix (their lengths differ otherwise)."""
    outs, weights = [], None
    for start, stop, prefix_k, prefix_v, first in joined.parts:
        out, weights = shared_prefix_attention(query[start:stop], prefix_k, prefix_v, joined.new_k[start:stop],
                                               joined.new_v[start:stop],
                                               _part_mask(mask, start, stop, first, prefix_k.shape[1], joined.n_columns),
                                               scaling, softcap)
        outs.append(out)
    if len(outs) == 1:
        return outs[0], weights
    return torch.cat(outs), None


class SharedPrefixAttention(contextlib.AbstractContextManager):
    """Eager attention of a replay's rows computed on the shared prefix (see module docstring).

        with calls.replaying():          # enters one of these for the blocks it replays
            ...

    ``calls`` is the :class:`~fvkit.fast.replay.BlockCalls` (or any object with
    ``joined`` and ``attended`` attributes) whose replaying cache update sets
    ``calls.joined`` to the :class:`JoinedRows` of the keys and values it just
    returned; each attention call that receives them adds one to ``calls.attended``.
    """

    def __init__(self, blocks, calls):
        self.calls = calls
        self._stack = contextlib.ExitStack()
        self._modules = modeling_modules(blocks)

    def __enter__(self):
        try:
            for module in self._modules:
                original = getattr(module, EAGER_FUNCTION)
                self._stack.enter_context(ReplaceMethod(module, EAGER_FUNCTION, self._attention(original)))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def _attention(self, original):
        calls = self.calls

        def attention(module, query, key, value, attention_mask, *args, **kwargs):
            joined = calls.joined
            if joined is None or key is not joined.keys or value is not joined.values:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            calls.joined = None  # read once; the rows' joined keys and values go with the attention call
            calls.attended += 1
            own = lambda: original(module, query, *joined.materialize(), attention_mask, *args, **kwargs)  # noqa: E731
            if (args or query.shape[-2] != 1 or _CHECKED.get(module, True) is not True
                    or module.training or kwargs.get("scaling") is None or query.dtype not in CHECKED_DTYPES
                    or any(kwargs.get(name) is not None for name in UNSUPPORTED_KWARGS)
                    or (attention_mask is not None and attention_mask.dtype == torch.bool)):
                return own()
            out = joined_attention(joined, query, attention_mask, kwargs["scaling"], kwargs.get("softcap"))
            if module not in _CHECKED:
                expected = own()
                drift = relative_drift(out[0], expected[0])
                if not drift <= CHECK_REL_TOL:
                    _CHECKED[module] = (f"its output differs from {original.__module__}.{EAGER_FUNCTION}'s by "
                                        f"{drift:.2e} of the largest (allowed {CHECK_REL_TOL:.0e})")
                    warnings.warn(f"shared-prefix attention refused for {type(module).__name__}: "
                                  f"{_CHECKED[module]}; the model's own attention is used", stacklevel=2)
                    return expected
                _CHECKED[module] = True
            return out

        return attention


def refusal(module) -> "str | None":
    """Why ``module`` keeps its own attention in replays (None when it does not, or was not checked)."""
    reason = _CHECKED.get(module)
    return reason if isinstance(reason, str) else None
