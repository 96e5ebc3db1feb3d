"""Re-running only the last token of a prompt on top of its clean keys and values.

    logits, cache = clean_prefix(model, inputs, n_rows=16, lm_head=head)
    calls = capture_last_token(model, blocks, inputs, cache, n_rows=16)
    with calls.replaying():
        out = calls.call_block(blocks, 3, torch.cat([calls.hidden(3)] * 2))   # twice the rows
    logits, calls = prompt_block_calls(model, blocks, inputs, n_rows=16, lm_head=head)   # the same from one pass

:func:`clean_prefix` runs the whole prompt once and keeps the key/value cache
of every position but the last, repeated over ``n_rows`` batch rows.
:func:`capture_last_token` runs the last token on that cache and records how
the model called each decoder block (hidden input, attention mask, position
data, cache object), so that any block can later be called again on its own,
with edited hidden states and any number of rows. While
:meth:`BlockCalls.replaying` is active the cache answers every block from the
clean prefix without growing, so blocks can be re-run in any order and any
number of times.

:func:`prompt_block_calls` gets the same record from the whole-prompt pass
alone, cutting each block's arguments to the last position (the capture pass
costs as much as a pass over the weights, about a tenth of a SmolLM2-135M
indirect-effect trial).

The prefix is cut and copied by :mod:`fvkit.fast.cache`, which refuses any
cache it does not understand. Replay assumes one thing more, shared by every
transformers release fvkit supports: attention layers read and extend a cache
object through its ``update(keys, values, layer_idx, ...)``, and a legacy
cache is never modified in place.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch

from fvkit.fast.cache_names import cache_kwargs, output_cache
from fvkit.errors import FvkitError
from fvkit.fast.cache import PrefixCache, UnsupportedCache, last_token_inputs
from fvkit.fast.prefix_attention import JoinedRows, PrefixPart, SharedPrefixAttention
from fvkit.models.tracer import BeforeCall, EditInput, ReplaceMethod


class ReplayUnsupported(FvkitError):
    """This model's forward pass cannot be re-run block by block (use the whole-model path)."""


def last_position_only(lm_head: Optional[torch.nn.Module], first_row_only: bool = False):
    """Let the output head read only the last position (and, optionally, only the first
    batch row): the logits the caller does not use are never computed."""
    if lm_head is None:
        return contextlib.nullcontext()
    rows = slice(0, 1) if first_row_only else slice(None)
    return EditInput(lm_head, lambda x: x[rows, -1:, :] if x.dim() == 3 else x)


def clean_prefix(model, inputs, n_rows: int, lm_head: Optional[torch.nn.Module] = None):
    """(clean last-token logits, cache of all positions but the last, ``n_rows`` rows)."""
    with last_position_only(lm_head):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=True)
    try:
        prefix = PrefixCache.from_output(output_cache(out), inputs["input_ids"].shape[1])
    except UnsupportedCache as err:
        # Unlike the layer sweep, the fast path has no whole-prompt fallback of its own.
        raise UnsupportedCache(f"the fast indirect effect cannot reuse this model's key/value cache ({err}); "
                               f"run with --ie-mode exact") from None
    return out.logits[0, -1, :], prefix.take(n_rows, reuse=True)


def _is_update_owner(value) -> bool:
    return callable(getattr(value, "update", None)) and hasattr(value, "get_seq_length")


def new_update_owners(args, kwargs, known: list) -> list:
    """The cache objects among a block call's arguments (besides the hidden state) not yet in ``known``."""
    found = []
    for value in (*args[1:], *kwargs.values()):
        if _is_update_owner(value) and all(value is not o for o in (*known, *found)):
            found.append(value)
    return found


def call_with_hidden(block, args, kwargs, hidden: torch.Tensor):
    """Call ``block`` as it was called with ``(args, kwargs)``, with ``hidden`` as its hidden-state input."""
    if args:
        return block(hidden, *args[1:], **kwargs)
    return block(**{**kwargs, "hidden_states": hidden})


def join_prefix(keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor,
                placeholders: bool = False) -> JoinedRows:
    """What a replaying update returns for its rows: the one-row prefix ``keys``/``values`` followed by
    each row's new ones, as :class:`~fvkit.fast.prefix_attention.JoinedRows`. With ``placeholders`` the
    joined copies are not built (the shared-prefix attention reads the prefix once and builds them only
    where the model's own attention has to read them)."""
    n_rows = key_states.shape[0]
    parts = [PrefixPart(0, n_rows, keys[0], values[0], 0)]
    if placeholders:
        return JoinedRows(parts, key_states, value_states, keys.shape[-2])
    joined = (torch.cat([keys.expand(n_rows, *keys.shape[1:]), key_states], dim=-2),
              torch.cat([values.expand(n_rows, *values.shape[1:]), value_states], dim=-2))
    return JoinedRows(parts, key_states, value_states, keys.shape[-2], *joined)


#: decoder blocks -> attention layers (``layer_idx``) seen reading a replay's joined keys and values
#: through the shared-prefix attention; their later replays get placeholders instead of copies.
_ATTENDING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

#: decoder blocks -> indices of the blocks :meth:`BlockCalls.learn_attending` has called.
_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _widen(value, capture_rows: int, n_rows: int):
    """``value`` with every batch-sized tensor (leading dim ``capture_rows``) widened to ``n_rows`` rows.

    All captured rows are identical (the capture ran one token on identical rows),
    so a broadcast view of the first row serves any number of rows without copying.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == capture_rows and n_rows != capture_rows:
            return value[:1].expand(n_rows, *value.shape[1:])
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_widen(v, capture_rows, n_rows) for v in value)
    return value


class BlockCalls:
    """How the model called each decoder block for the last token, replayable on any number of rows.

        calls = capture_last_token(model, blocks, inputs, cache, n_rows)
        with calls.replaying():
            h = calls.call_block(blocks, 2, torch.cat([calls.hidden(2)] * 3))

    The capture ran ``capture_rows`` identical rows; a block can be called again
    with any number of rows, each seeing the clean prefix.
    """

    def __init__(self, blocks, capture_rows: int):
        self.blocks = blocks
        self.calls: list = [None] * len(blocks)
        self.capture_rows = capture_rows
        self.owners: list = []      # cache objects the blocks were handed
        self.prefix: dict = {}      # layer_idx -> (keys, values) of one row, before the last token
        #: What the replaying update last returned and what it joined, and how many attention calls
        #: read such keys (see fvkit.fast.prefix_attention).
        self.joined: Optional[JoinedRows] = None
        self.attended = 0
        #: (layer_idx, placeholders handed out) of the replaying update in the block call under way.
        self._updated: Optional[tuple] = None
        self._attending = _ATTENDING.setdefault(blocks, set())

    def hidden(self, layer: int) -> torch.Tensor:
        args, kwargs = self.calls[layer]
        return args[0] if args else kwargs["hidden_states"]

    def call_block(self, blocks, layer: int, hidden: torch.Tensor):
        args, kwargs = self.calls[layer]
        n_rows = hidden.shape[0]
        args = args[:1] + _widen(tuple(args[1:]), self.capture_rows, n_rows)  # args[0] is replaced by ``hidden``
        kwargs = {k: _widen(v, self.capture_rows, n_rows) for k, v in kwargs.items()}
        before, self._updated = self.attended, None
        out = call_with_hidden(blocks[layer], args, kwargs, hidden)
        if self._updated is not None:
            layer_idx, placeholders = self._updated
            if self.attended == before + 1:
                self._attending.add(layer_idx)
            elif placeholders:
                raise ReplayUnsupported(f"attention layer {layer_idx} did not read its rows' keys through the "
                                        f"shared-prefix attention, and they were placeholders")
        return out

    def learn_attending(self) -> None:
        """Call every block not called so before once, on ``capture_rows`` rows, so that each layer
        learns whether its attention reads the shared prefix before the replay's own rows reach it.

        Without this a layer's first replay handed every row its own copy of the prefix; a pass
        of a few hundred such rows needs a tenth of the weights' memory, so a model's first trial
        ran in several passes (SmolLM2-135M: five, 0.4 s more than the trials after it). These
        calls copy the prefix for a few rows only, and their outputs are dropped. The rows are the
        clean inputs of different blocks, so that the shared-prefix attention's first-call check
        (:mod:`fvkit.fast.prefix_attention`) compares rows that differ.
        """
        probed = _PROBED.setdefault(self.blocks, set())
        todo = [layer for layer in range(len(self.blocks)) if layer not in probed]
        for layer in todo:
            own = self.hidden(layer)
            # Under a device map each block's input lives where that block runs.
            rows = [self.hidden((layer - k) % len(self.blocks))[:1].to(own.device) for k in range(self.capture_rows)]
            self.call_block(self.blocks, layer, torch.cat(rows))
            probed.add(layer)

    def placeholders_everywhere(self) -> bool:
        """Whether every replayed attention layer has been seen reading the shared prefix, so that no
        layer copies the prefix per row (what a pass's rows hold then, see the fast indirect effect)."""
        return bool(self.prefix) and set(self.prefix) <= self._attending

    def _record(self, owner, n_new=None):
        """``owner.update`` keeping each layer's keys and values before the new ones (before the
        last ``n_new`` positions, by default the update's own)."""
        original = owner.update

        def update(key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = original(key_states, value_states, layer_idx, *args, **kwargs)
            cut = key_states.shape[-2] if n_new is None else n_new
            # Contiguous, so that the shared-prefix attention's products read them as they are.
            self.prefix[layer_idx] = (keys[:1, ..., :-cut, :].contiguous(), values[:1, ..., :-cut, :].contiguous())
            return keys, values

        return update

    def _replay(self, owner):
        def update(key_states, value_states, layer_idx, *args, **kwargs):
            if layer_idx not in self.prefix:
                raise ReplayUnsupported(f"no clean keys/values were recorded for attention layer {layer_idx}")
            self.joined = None  # the previous layer's rows are not kept alive beside this layer's
            # A layer not yet seen attending through the shared prefix gets real copies: an attention
            # that bypasses it then still computes right, and call_block learns which it was.
            placeholders = layer_idx in self._attending
            self._updated = (layer_idx, placeholders)
            self.joined = join_prefix(*self.prefix[layer_idx], key_states, value_states, placeholders)
            return self.joined.keys, self.joined.values

        return update

    def _patched_updates(self, make) -> contextlib.ExitStack:
        with contextlib.ExitStack() as stack:
            for owner in self.owners:
                stack.enter_context(ReplaceMethod(owner, "update", make(owner)))
            return stack.pop_all()  # the caller's ``with`` restores them; a failure here already has

    def replaying(self):
        """Context in which every attention layer sees the clean prefix plus its new token, and nothing is
        stored; eager attention reads the prefix once for all rows (:mod:`fvkit.fast.prefix_attention`)."""
        stack = self._patched_updates(self._replay)
        try:
            stack.enter_context(SharedPrefixAttention(self.blocks, self))
        except BaseException:
            stack.close()
            raise
        stack.callback(setattr, self, "joined", None)
        return stack


def _record_block_calls(hooks: contextlib.ExitStack, blocks, rec: "BlockCalls", calls: list,
                        n_new: Optional[int] = None) -> None:
    """Enter on ``hooks`` what records each block's call into ``calls`` and has every cache object
    the blocks are handed keep each layer's prefix in ``rec`` (see :meth:`BlockCalls._record`)."""
    def on_call(layer):
        def record(args, kwargs):
            if not args and "hidden_states" not in kwargs:
                raise ReplayUnsupported(f"block {layer} was called without a hidden-state argument")
            calls[layer] = (args, dict(kwargs))
            for owner in new_update_owners(args, kwargs, rec.owners):
                rec.owners.append(owner)
                # Undone with the block hooks when the recording pass ends.
                hooks.enter_context(ReplaceMethod(owner, "update", rec._record(owner, n_new)))
        return record

    for i, block in enumerate(blocks):
        hooks.enter_context(BeforeCall(block, on_call=on_call(i)))


def capture_last_token(model, blocks, inputs, cache, n_rows: int, lm_head: Optional[torch.nn.Module] = None) -> BlockCalls:
    """Run the last token on ``cache`` and record every block's call and every layer's clean prefix."""
    rec = BlockCalls(blocks, n_rows)
    with contextlib.ExitStack() as hooks:
        _record_block_calls(hooks, blocks, rec, rec.calls)
        # Its logits are not used: the blocks' recorded calls are what this run is for.
        with last_position_only(lm_head, first_row_only=True):
            model(**last_token_inputs(inputs, n_rows), **cache_kwargs(model, cache), use_cache=True)
    missing = [i for i, call in enumerate(rec.calls) if call is None]
    if missing:
        raise ReplayUnsupported(f"blocks {missing} did not run for the last token")
    return rec


def prompt_block_calls(model, blocks, inputs, n_rows: int, lm_head: Optional[torch.nn.Module] = None) -> tuple:
    """(clean last-token logits, :class:`BlockCalls`) from the whole-prompt pass alone, without
    the capture pass of :func:`capture_last_token`.

    Each block's call for the last token is its call for the whole prompt cut to the last
    query position: the hidden state's last row, the attention mask's last query row, the
    last position's ids and embeddings; each layer's prefix is what its cache update held
    before the last token. Batch-sized arguments are widened to ``n_rows`` identical rows,
    as a capture would have recorded them. An argument spanning the prompt in a way not
    known here raises :class:`ReplayUnsupported` (the caller then captures).
    """
    n_tokens = inputs["input_ids"].shape[1]
    if n_tokens < 2:
        raise ReplayUnsupported("a one-token prompt has no prefix to replay on")
    rec = BlockCalls(blocks, n_rows)
    whole = [None] * len(blocks)
    with contextlib.ExitStack() as hooks:
        _record_block_calls(hooks, blocks, rec, whole, n_new=1)
        with last_position_only(lm_head):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=True)
    if any(call is None for call in whole) or len(rec.prefix) != len(blocks) or len(rec.owners) != 1:
        raise ReplayUnsupported("the blocks did not each run once with their keys in one cache object")
    if any(k.shape[-2] != n_tokens - 1 for k, _ in rec.prefix.values()):
        raise ReplayUnsupported("a layer's cache did not hold the prompt's positions")
    rec.calls = [last_positions_call(args, kwargs, n_tokens, n_rows) for args, kwargs in whole]
    return out.logits[0, -1, :], rec


#: Block arguments that span the prompt's positions and how the last position is cut from
#: them: (axis, whether their first axis is the batch).
_POSITION_ARGS = {"hidden_states": (-2, True), "attention_mask": (-2, True), "position_ids": (-1, True),
                  "cache_position": (-1, False)}


def last_positions_call(args, kwargs, n_tokens: int, n_rows: int, width: int = 1) -> tuple:
    """A block call on the whole prompt cut to its last ``width`` query positions, in ``n_rows`` rows."""
    def cut(name, value):
        if isinstance(value, torch.Tensor) and name in _POSITION_ARGS:
            axis, batched = _POSITION_ARGS[name]
            if value.shape[axis] == n_tokens and (not batched or value.shape[0] == 1):
                last = value.narrow(axis, n_tokens - width, width).clone()   # not a view of the prompt's tensor
                return last.expand(n_rows, *last.shape[1:]) if batched else last
        if is_position_embeddings(name, value, n_tokens):
            return tuple(t[..., -width:, :].clone().expand(n_rows, *t.shape[1:-2], width, t.shape[-1])
                         for t in value)
        if spans_positions(value, n_tokens):
            raise ReplayUnsupported(f"block argument '{name}' spans the prompt's positions in a way the "
                                    f"last positions' call cannot be cut from")
        return value

    if args and any(spans_positions(a, n_tokens) for a in args[1:]):
        raise ReplayUnsupported("a block takes position-sized arguments positionally")
    new_args = (cut("hidden_states", args[0]),) + tuple(args[1:]) if args else ()
    return new_args, {name: cut(name, value) for name, value in kwargs.items()}


def is_position_embeddings(name: str, value, n_tokens: int) -> bool:
    """Whether a block argument is a prompt's rotary embeddings: ``position_embeddings*``, a tuple of
    one-row tensors with the prompt's positions on their second-to-last axis."""
    return name.startswith("position_embeddings") and isinstance(value, tuple) and all(
        isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == 1 and t.shape[-2] == n_tokens for t in value)


def spans_positions(value, n_tokens: int) -> bool:
    """A tensor (or a tuple, list or dict holding one) with an axis as long as the prompt."""
    if isinstance(value, torch.Tensor):
        return n_tokens in value.shape
    if isinstance(value, (tuple, list)):
        return any(spans_positions(v, n_tokens) for v in value)
    if isinstance(value, dict):
        return any(spans_positions(v, n_tokens) for v in value.values())
    return False
