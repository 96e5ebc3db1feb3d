"""Every edited row of a prompt's last token in one model call on the prompt's clean prefix.

    rows = forward_rows(lm, inputs, prefix, vec, layers=[3, 7])   # rows for layers 3 and 7, then the clean row
    a, b = group_rows(lm, [(inputs_a, prefix_a), (inputs_b, prefix_b)], vec, layers=[3, 7])   # two prompts, one call

The cached evaluation (:mod:`fvkit.fast.evaluation`) needs, for one prompt, the
last position's logits with the vector added to block ``L``'s output, for every
evaluated ``L``, and once without it. The block replay gets them by recording
how the model calls each block for the last token (a capture pass) and then
calling the blocks one by one, each layer's row joining at its block. Here the
last token instead runs once through the whole model in one batch row per layer
and a clean row, and a hook on block ``L`` adds the vector to its row's output.
A row computes the blocks below its layer as the clean row does, redundant work
that one token makes cheap, in exchange for one model call instead of two passes
and a Python loop over the blocks (measured on SmolLM2-135M, 30 layers: 0.16
against 0.23 s per zero-shot prompt, 0.19 against 0.27 s per 10-shot one).

Several prompts run in the same call (:func:`group_rows`), each in its own rows:
a one-token pass costs little more for a few hundred rows than for thirty, since
reading and packing the weights dominates it (SmolLM2-135M, 30 layers and a clean
row per prompt: 0.17 s for one prompt, 0.39 s for four).

The model is handed the longest prompt's prefix cache, whose ``update`` answers
each layer with every prompt's prefix (read once, by an update that appends
nothing) and the rows' new keys and values, and stores nothing. Shorter prompts
are left-padded to the longest in the attention mask and given their own
positions, so every prefix ends just before its rows' token. No prefix is copied
per row: eager attention meets each prompt's prefix once for all of its rows
(:mod:`fvkit.fast.prefix_attention`), and the joined keys and values the update
hands back are placeholders that are only built where the model's own attention
has to read them; a model whose attention does not go through that function is
refused. A legacy tuple cache, which has no ``update``, is refused
(:class:`NoCacheUpdate`), and so is a model whose clean row does not reproduce
the whole-prompt pass's logits (:func:`check_clean_row`); the caller then uses
the block replay.
"""

from __future__ import annotations

import contextlib
import types

import torch

from fvkit.fast.cache import PrefixCache, is_cache_object
from fvkit.fast.cache_names import cache_kwargs
from fvkit.fast.indirect_effect import BATCH_ROW_MULTIPLE, clean_row_drift
from fvkit.fast.prefix_attention import EAGER_FUNCTION, JoinedRows, PrefixPart, SharedPrefixAttention
from fvkit.fast.replay import ReplayUnsupported
from fvkit.models import adapters
from fvkit.models.placement import to_like
from fvkit.models.tracer import ReplaceMethod, Trace, first_tensor, replace_first_tensor


class NoCacheUpdate(ReplayUnsupported):
    """The model returns a legacy tuple cache, which has no ``update`` to answer from: the block
    replay is this model's way, not a failure."""


def _prefix_update(caches, state):
    """``update`` answering every layer with each prompt's prefix and the rows' new keys, storing nothing."""
    originals = [cache.update for cache in caches]

    def update(key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in state.prefix:
            prefixes = []
            for i, original in enumerate(originals):
                # Appending no position returns what the layer holds: the prefix, one row.
                keys, values = original(key_states[:1, ..., :0, :], value_states[:1, ..., :0, :], layer_idx,
                                        *args, **kwargs)
                if keys.shape[0] != 1:
                    raise ReplayUnsupported(f"the prefix cache of layer {layer_idx} holds {keys.shape[0]} rows, expected 1")
                if len(originals) > 1 and keys.shape[-2] != state.lengths[i]:
                    # Left-padding puts every prefix's last position just before the new token's.
                    raise ReplayUnsupported(f"the prefix cache of layer {layer_idx} holds {keys.shape[-2]} positions "
                                            f"of a {state.lengths[i]}-position prefix")
                prefixes.append((keys[0].contiguous(), values[0].contiguous()))
            state.prefix[layer_idx] = prefixes
        prefixes = state.prefix[layer_idx]
        state.joined = None  # the previous layer's rows are not kept alive beside this layer's
        n_columns = max(k.shape[1] for k, _ in prefixes)
        parts = [PrefixPart(start, stop, k, v, n_columns - k.shape[1]) for (start, stop), (k, v) in zip(state.rows, prefixes)]
        state.joined = JoinedRows(parts, key_states, value_states, n_columns)
        return state.joined.keys, state.joined.values

    return update


def _adder(rows: list, vec: torch.Tensor):
    def add(output):
        hidden = first_tensor(output).clone()
        hidden[rows, -1] += to_like(vec, hidden)  # the block's device and dtype, wherever it runs
        return replace_first_tensor(output, hidden)
    return add


def _row_inputs(items, per_item: int, padded: int, n_prefix: int) -> dict:
    """Each prompt's last token in its rows (the last prompt's also fill the padding), with an
    attention mask over the longest prefix, left-padded, and, where lengths differ, each row's position."""
    counts = [per_item] * (len(items) - 1) + [padded - per_item * (len(items) - 1)]
    ids, masks, positions = [], [], []
    for (inputs, prefix), n in zip(items, counts):
        ids.append(inputs["input_ids"][:, -1:].expand(n, 1))
        mask = inputs["attention_mask"]
        masks.append(torch.cat([mask.new_zeros(1, n_prefix - prefix.length), mask], dim=1).expand(n, n_prefix + 1))
        positions.append(torch.full((n, 1), prefix.length, dtype=torch.long, device=mask.device))
    out = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
    if any(prefix.length != n_prefix for _, prefix in items):
        out["position_ids"] = torch.cat(positions)
    return out


def forward_rows(lm, inputs, prefix: PrefixCache, vec: torch.Tensor, layers) -> torch.Tensor:
    """(len(layers) + 1, vocabulary) last-token logits of one prompt: row ``i`` with ``vec`` added
    to block ``layers[i]``'s output, the last row clean."""
    return group_rows(lm, [(inputs, prefix)], vec, layers)[0]


def group_rows(lm, items, vec: torch.Tensor, layers) -> list:
    """:func:`forward_rows` for several prompts ``items`` ((inputs, PrefixCache) each) in one model
    call; a list of each prompt's rows. The prefixes are read, never changed."""
    model, spec = lm.model, lm.spec
    layers = list(layers)
    per_item = len(layers) + 1
    n_rows = per_item * len(items)
    padded = -(-n_rows // BATCH_ROW_MULTIPLE) * BATCH_ROW_MULTIPLE  # see BATCH_ROW_MULTIPLE
    caches = [prefix.stored() for _, prefix in items]
    plain = [type(cache).__name__ for cache in caches if not is_cache_object(cache)]
    if plain:
        raise NoCacheUpdate(f"a {plain[0]} cache has no update to answer from the prefix")
    lengths = [prefix.length for _, prefix in items]
    carrier = caches[lengths.index(max(lengths))]  # the longest prefix: the model sizes its mask by it
    state = types.SimpleNamespace(prefix={}, joined=None, attended=0, lengths=lengths,
                                  rows=[(i * per_item, (i + 1) * per_item) for i in range(len(items) - 1)]
                                  + [((len(items) - 1) * per_item, padded)])
    blocks = adapters.resolve_blocks(model, spec)
    rows_of = {}
    for j, layer in enumerate(layers):
        rows_of.setdefault(layer, []).extend(i * per_item + j for i in range(len(items)))
    with contextlib.ExitStack() as stack:
        stack.enter_context(ReplaceMethod(carrier, "update", _prefix_update(caches, state)))
        stack.enter_context(SharedPrefixAttention(blocks, state))
        hooks = [stack.enter_context(Trace(model, adapters.block_name(spec, layer), retain_output=False,
                                           edit_output=_adder(rows, vec)))
                 for layer, rows in rows_of.items()]
        out = model(**_row_inputs(items, per_item, padded, max(lengths)), **cache_kwargs(model, carrier),
                    use_cache=True)
    unfired = [layer for layer, hook in zip(rows_of, hooks) if hook.fired != 1]
    if unfired:
        raise ReplayUnsupported(f"the vector's hooks on blocks {unfired} did not run once")
    if len(state.prefix) != len(blocks):
        raise ReplayUnsupported(f"{len(state.prefix)} of {len(blocks)} attention layers read the prefix cache")
    if state.attended != len(blocks):
        # Keys handed back by the update are placeholders until an eager attention call reads them.
        raise ReplayUnsupported(f"{state.attended} of {len(blocks)} attention layers went through "
                                f"{EAGER_FUNCTION}, which the rows' keys need")
    logits = out.logits[:, -1, :]
    return [logits[i * per_item:(i + 1) * per_item] for i in range(len(items))]


def check_clean_row(row: torch.Tensor, clean_logits: torch.Tensor) -> None:
    """The clean row must reproduce the whole-prompt pass's last logits to float rounding
    (the fast indirect effect's bound: CLEAN_ROW_REL_TOL, or a few epsilons of the dtype);
    a wrong position, mask or cache is off by O(1)."""
    drift, allowed = clean_row_drift(row, clean_logits)
    if not drift <= allowed:
        raise ReplayUnsupported(f"the last token run on the prefix gave logits {drift:.2e} of their scale away "
                                f"from the whole prompt's (allowed {allowed:.1e})")
