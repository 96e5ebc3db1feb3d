"""The fast indirect effect's rows carried through the prompt's own pass, as extra positions.

    clean_logits, rows = merged_rows(lm, setup, mean_acts, head)   # rows: (1, R, hidden) after the last block

The ``blocks`` strategy (:mod:`fvkit.fast.indirect_effect`) runs the prompt once,
recording how each block was called, then its rows block by block: every layer's
weights are read twice per trial, and the first blocks multiply a dozen rows,
where a matrix product runs at a third of its speed. Here the rows ride in the
prompt's pass itself. Block ``L`` receives the prompt's ``n`` positions followed
by the rows that reached it and the rows joining at ``L`` (copies of the prompt's
last position: one per head, and at block 0 one unpatched), so each linear layer
multiplies ``n + R`` rows at once; after the block the rows are taken off again
and the model's forward carries on with the prompt alone.

Position-wise arguments of the blocks (position ids, rotary embeddings, cache
positions) are extended with the last position's values for the rows; an
argument spanning the prompt in another way is refused. Attention is computed in
two parts, through the ``eager_attention_forward`` of the blocks' modeling modules:
the prompt's positions by the model's own function on the prompt's queries, keys,
values and mask, exactly what it computes for the prompt alone; the rows by the
shared-prefix attention (:func:`~fvkit.fast.prefix_attention.shared_prefix_attention`)
on the prompt's keys before the last position, each row with its own key, under the
last position's mask row. A block whose attention does not go through that function
with the merged positions is refused, and so is any call the shared-prefix attention
does not implement.

The caller checks what is computed: the unpatched row must reproduce the prompt's
logits (as in the ``blocks`` strategy), and, once per model, the prompt's logits
from the merged pass must be those of a pass without rows (:func:`check_prompt_part`),
which catches a model that mixes positions outside attention.
"""

from __future__ import annotations

import contextlib
import types

import torch

from fvkit.fast.prefix_attention import (CHECKED_DTYPES, EAGER_FUNCTION, UNSUPPORTED_KWARGS, modeling_modules,
                                         shared_prefix_attention)
from fvkit.fast.replay import ReplayUnsupported, is_position_embeddings, last_position_only, spans_positions
from fvkit.method.head_effect import head_patch
from fvkit.models import adapters
from fvkit.models.tracer import BeforeCall, EditInput, ReplaceMethod, Trace, first_tensor, replace_first_tensor

#: Block arguments extended with the last position's values: name -> position axis.
_POSITION_ARGS = {"position_ids": -1, "cache_position": -1}


def _repeat_last(t: torch.Tensor, axis: int, r: int) -> torch.Tensor:
    last = t.narrow(axis, t.shape[axis] - 1, 1)
    shape = list(t.shape)
    shape[axis] = r
    return torch.cat([t, last.expand(*shape)], dim=axis)


def extend_argument(name: str, value, n: int, r: int):
    """A block's keyword argument for ``n`` prompt positions followed by ``r`` rows at the last one."""
    if name == "attention_mask":
        return value  # read by the merged attention for the prompt's positions and, last row, for the rows
    if isinstance(value, torch.Tensor) and name in _POSITION_ARGS and value.shape[_POSITION_ARGS[name]] == n:
        return _repeat_last(value, _POSITION_ARGS[name], r)
    if is_position_embeddings(name, value, n):
        return tuple(_repeat_last(t, -2, r) for t in value)
    if spans_positions(value, n):
        raise ReplayUnsupported(f"block argument '{name}' spans the prompt's positions in a way the merged "
                                f"pass cannot extend to its rows")
    return value


def positions_patch(patch):
    """A :func:`~fvkit.method.head_patch.head_patch` edit (rows of a batch) applied to positions of one sequence."""
    return lambda x: patch(x.reshape(-1, 1, x.shape[-1])).reshape(x.shape)


def _merged_attention(original, state):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        n = state.n
        if state.rows_in_block is None or query.shape[-2] != n + state.rows_in_block:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        if (args or query.shape[0] != 1 or module.training or kwargs.get("scaling") is None
                or query.dtype not in CHECKED_DTYPES or any(kwargs.get(k) is not None for k in UNSUPPORTED_KWARGS)
                or (attention_mask is not None and attention_mask.dtype == torch.bool)):
            raise ReplayUnsupported(f"the merged pass's attention does not implement this call of "
                                    f"{type(module).__name__} ({query.dtype}, mask "
                                    f"{None if attention_mask is None else attention_mask.dtype})")
        state.attended += 1
        prompt, _ = original(module, query[:, :, :n], key[:, :, :n], value[:, :, :n], attention_mask, **kwargs)
        rows = lambda t: t[0, :, n:].transpose(0, 1).unsqueeze(2)  # noqa: E731  (R, heads, 1, d)
        mask = None if attention_mask is None else attention_mask[:, :, n - 1:n, :n]
        out, _ = shared_prefix_attention(rows(query), key[0, :, :n - 1], value[0, :, :n - 1], rows(key), rows(value),
                                         mask, kwargs["scaling"], kwargs.get("softcap"))
        return torch.cat([prompt, out.transpose(0, 1).to(prompt.dtype)], dim=1), None

    return attention


def merged_rows(lm, setup, mean_acts: torch.Tensor, head, row_multiple: int) -> tuple:
    """(the prompt's last-position logits, (1, R, hidden) rows after the last block): row 0 unpatched,
    then one row per head of each layer in order, patched at that layer's out-projection input.

    Each block's batch of positions is padded with copies of the last position to a multiple of
    ``row_multiple`` (the fast indirect effect's BATCH_ROW_MULTIPLE); the copies are dropped."""
    dims, model, spec = lm.dims, lm.model, lm.spec
    n = setup.inputs["input_ids"].shape[1]
    if n < 2:
        raise ReplayUnsupported("a one-token prompt has no prefix to attend to")
    blocks = adapters.resolve_blocks(model, spec)
    state = types.SimpleNamespace(n=n, rows=None, n_real=0, rows_in_block=None, attended=0)

    def extend(layer):
        def edit(args, kwargs):
            if not args or "hidden_states" in kwargs:
                raise ReplayUnsupported(f"block {layer} was called without a positional hidden state")
            hidden = args[0]
            if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[1] != n:
                raise ReplayUnsupported(f"block {layer} got hidden states of shape {tuple(hidden.shape)}, "
                                        f"not the prompt's (1, {n}, ...)")
            if any(spans_positions(a, n) for a in args[1:]):
                raise ReplayUnsupported(f"block {layer} takes position-sized arguments positionally")
            last = hidden[:, n - 1:n]
            joining = last.expand(1, dims.n_heads + (layer == 0), last.shape[-1])
            rows = joining if state.rows is None else torch.cat([state.rows.to(hidden.device), joining], dim=1)
            state.n_real = rows.shape[1]
            pad = -(n + rows.shape[1]) % row_multiple
            if pad:
                rows = torch.cat([rows, last.expand(1, pad, last.shape[-1])], dim=1)
            r = state.rows_in_block = rows.shape[1]
            return (torch.cat([hidden, rows], dim=1), *args[1:]), {k: extend_argument(k, v, n, r) for k, v in kwargs.items()}
        return edit

    def split(layer):
        def edit(output):
            hidden = first_tensor(output)
            if state.rows_in_block is None or hidden.shape[1] != n + state.rows_in_block:
                raise ReplayUnsupported(f"block {layer} did not hand back its merged positions")
            state.rows, state.rows_in_block = hidden[:, n:n + state.n_real], None
            return replace_first_tensor(output, hidden[:, :n])
        return edit

    with contextlib.ExitStack() as stack:
        for module in modeling_modules(blocks):
            stack.enter_context(ReplaceMethod(module, EAGER_FUNCTION,
                                              _merged_attention(getattr(module, EAGER_FUNCTION), state)))
        calls = [stack.enter_context(BeforeCall(block, edit_call=extend(i))) for i, block in enumerate(blocks)]
        outs = [stack.enter_context(Trace(model, adapters.block_name(spec, i), module=block, retain_output=False,
                                          edit_output=split(i))) for i, block in enumerate(blocks)]
        edits = []
        for layer in range(dims.n_layers):
            patch = head_patch(mean_acts, layer, setup.last_slots, dims.n_heads, dims.head_dim,
                               first_row=n + 1 + layer * dims.n_heads)
            edits.append(stack.enter_context(EditInput(adapters.resolve_out_proj(model, spec, layer),
                                                       positions_patch(patch))))
        stack.enter_context(last_position_only(head))
        out = model(input_ids=setup.inputs["input_ids"], attention_mask=setup.inputs["attention_mask"], use_cache=False)
    unfired = [i for i, (c, o) in enumerate(zip(calls, outs)) if c.fired != 1 or o.fired != 1]
    if unfired:
        raise ReplayUnsupported(f"blocks {unfired} did not run once in the merged pass")
    if state.attended != len(blocks):
        raise ReplayUnsupported(f"{state.attended} of {len(blocks)} blocks' attention went through "
                                f"{EAGER_FUNCTION} with the merged positions")
    return out.logits[0, -1, :], state.rows, edits


def prompt_logits(model, inputs, head) -> torch.Tensor:
    """The prompt's last-position logits from a pass without rows."""
    with last_position_only(head):
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits[0, -1, :]
