"""A prompt's key/value cache, cut back by one token and copied into several rows.

    out = model(**inputs, use_cache=True)                  # the whole prompt, once
    prefix = PrefixCache.from_output(output_cache(out), inputs["input_ids"].shape[1])
    cache = prefix.take(rows=8)                            # 8 rows that all hold the prompt minus its last token
    model(input_ids=last_token.expand(8, 1), attention_mask=..., past_key_values=cache)

transformers returns either a ``Cache`` object (``DynamicCache`` and friends,
which can ``crop`` and ``batch_repeat_interleave`` in place) or, in older
releases and for some architectures, the legacy tuple of per-layer tuples of
``(batch, heads, seq, head_dim)`` tensors. Both are handled; any other cache
raises :class:`UnsupportedCache` so the caller can fall back to whole-prompt
passes instead of reusing a cache it does not understand.
"""

from __future__ import annotations

import copy

import torch

from .errors import FvkitError


class UnsupportedCache(FvkitError):
    """The model's cache cannot be cut and replicated; use whole-prompt forwards."""


def _is_cache_object(cache) -> bool:
    return all(hasattr(cache, attr) for attr in ("crop", "batch_repeat_interleave", "get_seq_length"))


def _map_tensors(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    raise UnsupportedCache(f"legacy cache holds a {type(value).__name__}, expected tensors")


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
        if n_tokens < 2:
            raise UnsupportedCache("a one-token prompt has no prefix to cache")
        keep = n_tokens - 1
        if _is_cache_object(cache):
            if getattr(cache, "is_croppable", True) is False:
                raise UnsupportedCache(f"{type(cache).__name__} cannot be cropped")
            if cache.get_seq_length() != n_tokens:
                raise UnsupportedCache(
                    f"{type(cache).__name__} holds {cache.get_seq_length()} tokens, expected {n_tokens}")
            # A negative count removes that many tokens in every release (4.x also
            # reads a positive value as a length, 5.x rejects one).
            cache.crop(-1)
            if cache.get_seq_length() != keep:
                raise UnsupportedCache(f"{type(cache).__name__}.crop(-1) left {cache.get_seq_length()} tokens")
            return cls(cache, keep)
        if isinstance(cache, (tuple, list)) and cache:
            def cut(t: torch.Tensor) -> torch.Tensor:
                # Legacy layout is (batch, heads, seq, head_dim); anything else is not understood.
                if t.dim() != 4 or t.shape[0] != 1 or t.shape[-2] != n_tokens:
                    raise UnsupportedCache(f"legacy cache tensor of shape {tuple(t.shape)} is not "
                                           f"(1, heads, {n_tokens}, head_dim)")
                return t[..., :keep, :]
            return cls(_map_tensors(cache, cut), keep)
        raise UnsupportedCache(f"cache of type {type(cache).__name__} is not supported")

    def take(self, rows: int, reuse: bool = False):
        """A cache with ``rows`` identical rows. ``reuse=True`` expands the stored cache in
        place (cheaper; the PrefixCache must not be used again afterwards)."""
        if self._cache is None:
            raise FvkitError("this PrefixCache was already handed over with reuse=True")
        if _is_cache_object(self._cache):
            cache = self._cache if reuse else copy.deepcopy(self._cache)
            cache.batch_repeat_interleave(rows)
        else:
            cache = _map_tensors(self._cache, lambda t: t.repeat_interleave(rows, dim=0))
        if reuse:
            self._cache = None
        return cache
