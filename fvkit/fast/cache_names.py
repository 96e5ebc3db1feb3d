"""The key/value cache's name in model calls and outputs, across transformers releases.

    out = model(**inputs, **cache_kwargs(model, None), use_cache=True)
    cache = output_cache(out)
    model(**step, **cache_kwargs(model, cache), use_cache=True)

transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still
works there, with a deprecation warning).
"""

from __future__ import annotations

import inspect


def cache_argument(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    return {cache_argument(model): cache}


def output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
