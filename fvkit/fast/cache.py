"""A prompt's key/value cache: cut back, copied into several rows, checked.

    out = model(**inputs, use_cache=True)                  # the whole prompt, once
    prefix = PrefixCache.from_output(output_cache(out), inputs["input_ids"].shape[1])
    cache = prefix.take(rows=8)                            # 8 rows that all hold the prompt minus its last token
    model(input_ids=last_token.expand(8, 1), attention_mask=..., **cache_kwargs(model, cache))
    if is_cache_object(cache):
        drop_last(cache, 1)                                # back to the prefix after that step

This module is the one place fvkit touches a cache's contents: the layer
sweep (:mod:`fvkit.fast.sweep`) and the fast indirect effect
(:mod:`fvkit.fast.replay`) both take their prefixes from it. How a cache is
passed to and read from a model call is :mod:`fvkit.fast.cache_names`'s business.

transformers returns either a ``Cache`` object (``DynamicCache`` and friends,
which can ``crop`` and ``batch_repeat_interleave`` in place) or, in older
releases and for some architectures, the legacy tuple of per-layer tuples of
``(batch, heads, seq, head_dim)`` tensors, which the model never modifies in
place. Both are handled; any other cache raises :class:`UnsupportedCache` so
the caller can fall back to whole-prompt passes instead of reusing a cache it
does not understand.
"""

from __future__ import annotations

import copy
from typing import Iterator

import torch

from fvkit.errors import FvkitError


class UnsupportedCache(FvkitError):
    """The model's cache cannot be cut and replicated; use whole-prompt forwards."""


def is_cache_object(cache) -> bool:
    """A ``Cache`` object (cut and copied in place), as opposed to a legacy tuple."""
    # Attention layers read and extend a cache object through ``update``; one without
    # it could be cut and copied but not run on.
    return all(hasattr(cache, attr) for attr in ("crop", "batch_repeat_interleave", "get_seq_length", "update"))


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    else:
        raise UnsupportedCache(f"legacy cache holds a {type(value).__name__}, expected tensors")


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    raise UnsupportedCache(f"legacy cache holds a {type(value).__name__}, expected tensors")


def cache_length(cache) -> int:
    """How many positions ``cache`` holds."""
    if is_cache_object(cache):
        return int(cache.get_seq_length())
    lengths = {t.shape[-2] for t in _tensors(cache)}
    if len(lengths) != 1:
        raise UnsupportedCache(f"legacy cache tensors hold different numbers of positions: {sorted(lengths)}")
    return int(lengths.pop())


def drop_last(cache, n: int):
    """``cache`` without its last ``n`` positions (a cache object is cropped in place and returned)."""
    if n < 1:
        raise ValueError(f"drop_last needs n >= 1, got {n}")
    if is_cache_object(cache):
        # A negative count removes that many positions in every release (4.x also
        # reads a positive value as a length, 5.x rejects one).
        cache.crop(-n)
        return cache
    return _map_tensors(cache, lambda t: t[..., :t.shape[-2] - n, :])


def repeat_rows(cache, rows: int):
    """``cache`` with each batch row repeated ``rows`` times (a cache object is expanded in place and returned)."""
    if is_cache_object(cache):
        cache.batch_repeat_interleave(rows)
        return cache
    return _map_tensors(cache, lambda t: t.repeat_interleave(rows, dim=0))


def _check_whole_prompt(cache, n_tokens: int) -> None:
    """Refuse a cache that is not one row holding exactly the ``n_tokens`` of a prompt."""
    if is_cache_object(cache):
        if getattr(cache, "is_croppable", True) is False:
            raise UnsupportedCache(f"{type(cache).__name__} cannot be cropped")
        if cache.get_seq_length() != n_tokens:
            raise UnsupportedCache(
                f"{type(cache).__name__} holds {cache.get_seq_length()} tokens, expected {n_tokens}")
    elif isinstance(cache, (tuple, list)) and cache:
        for t in _tensors(cache):
            # Slicing the position axis is only right for this layout; anything else is not understood.
            if t.dim() != 4 or t.shape[0] != 1 or t.shape[-2] != n_tokens:
                raise UnsupportedCache(f"legacy cache tensor of shape {tuple(t.shape)} is not "
                                       f"(1, heads, {n_tokens}, head_dim)")
    else:
        raise UnsupportedCache(f"cache of type {type(cache).__name__} is not supported")


def last_token_inputs(inputs, n_rows: int) -> dict:
    """The prompt's last token in ``n_rows`` rows, to run on its prefix's cache: the
    attention mask keeps the whole prompt (as in generation), every other tokenizer
    field is cut to the last position."""
    out = {}
    for key, value in inputs.items():
        if key == "attention_mask":
            out[key] = value.expand(n_rows, value.shape[1])
        else:
            out[key] = value[:, -1:].expand(n_rows, 1)
    return out


class PrefixCache:
    """The cache of a prompt minus its last token, handed out as fresh multi-row copies.

        prefix = PrefixCache.from_output(output_cache(out), n_tokens)
        first = prefix.take(rows=4)     # a copy; the stored prefix is never modified
        last = prefix.take(rows=4, reuse=True)   # hands over the stored cache itself (final use)
    """

    def __init__(self, cache, length: int):
        self._cache = cache
        self.length = length

    @classmethod
    def from_output(cls, cache, n_tokens: int) -> "PrefixCache":
        """The prefix of a one-row cache of ``n_tokens`` positions (a cache object is cropped in place)."""
        if n_tokens < 2:
            raise UnsupportedCache("a one-token prompt has no prefix to cache")
        _check_whole_prompt(cache, n_tokens)
        cut = drop_last(cache, 1)
        # A cache that crops to some other length would put every later position in the wrong place.
        if cache_length(cut) != n_tokens - 1:
            raise UnsupportedCache(f"{type(cache).__name__} holds {cache_length(cut)} positions after dropping "
                                   f"the last of {n_tokens}")
        return cls(cut, n_tokens - 1)

    def stored(self):
        """The stored one-row cache itself, for callers that only read it (its update is never
        called with new positions)."""
        if self._cache is None:
            raise FvkitError("this PrefixCache was already handed over with reuse=True")
        return self._cache

    def take(self, rows: int, reuse: bool = False):
        """A cache with ``rows`` identical rows. ``reuse=True`` expands the stored cache in
        place (cheaper; the PrefixCache must not be used again afterwards)."""
        if self._cache is None:
            raise FvkitError("this PrefixCache was already handed over with reuse=True")
        cache = self._cache
        if reuse:
            self._cache = None
        elif is_cache_object(cache):
            cache = copy.deepcopy(cache)  # repeat_rows expands a cache object in place
        return repeat_rows(cache, rows)
