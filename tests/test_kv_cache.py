"""Cutting a prompt's cache back and copying it into rows."""

import pytest
import torch

import fvkit.fast.cache as kv_cache
from fvkit.errors import FvkitError
from fvkit.fast.cache import PrefixCache, UnsupportedCache, cache_length, drop_last, is_cache_object, repeat_rows


def legacy(n_tokens, layers=2):
    return tuple((torch.arange(2 * 3 * n_tokens * 4, dtype=torch.float32).reshape(1, 3 * 2, n_tokens, 4)[:, :3],
                  torch.ones(1, 3, n_tokens, 4)) for _ in range(layers))


def test_legacy_tuples_are_cut_and_copied_without_touching_the_prefix():
    prefix = PrefixCache.from_output(legacy(5), 5)
    assert prefix.length == 4
    rows = prefix.take(3)
    assert len(rows) == 2 and rows[0][0].shape == (3, 3, 4, 4)
    assert torch.equal(rows[0][0][2], legacy(5)[0][0][0, :, :4])
    rows[0][0].add_(1)
    again = prefix.take(1)
    assert torch.equal(again[0][0][0], legacy(5)[0][0][0, :, :4])


def test_cache_objects_are_cropped_and_repeated(zoo_model):
    lm = zoo_model("tiny-llama")
    inputs = lm.tokenizer(["Q: hot\nA: cold\n\nQ: up\nA:"], return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        cache = lm.model(**inputs, use_cache=True).past_key_values
    if isinstance(cache, tuple):
        pytest.skip("this transformers release returns legacy tuples for tiny-llama")
    assert is_cache_object(cache)
    prefix = PrefixCache.from_output(cache, n)
    copy = prefix.take(4)
    assert copy.get_seq_length() == n - 1
    assert drop_last(copy, 2) is copy and cache_length(copy) == n - 3
    last = prefix.take(2, reuse=True)
    assert last.get_seq_length() == n - 1
    with pytest.raises(FvkitError, match="already handed over"):
        prefix.take(1)


def test_legacy_tuples_lose_any_number_of_positions_and_gain_rows():
    cache = legacy(5)
    assert not is_cache_object(cache) and cache_length(cache) == 5
    cut = drop_last(cache, 2)
    assert cache_length(cut) == 3 and torch.equal(cut[1][0], cache[1][0][..., :3, :])
    rows = repeat_rows(cut, 2)
    assert rows[0][0].shape == (2, 3, 3, 4) and torch.equal(rows[0][0][1], cut[0][0][0])
    with pytest.raises(ValueError):
        drop_last(cache, 0)


def test_a_cut_that_leaves_the_wrong_length_is_refused(monkeypatch):
    drop = kv_cache.drop_last
    monkeypatch.setattr(kv_cache, "drop_last", lambda cache, n: drop(cache, n + 1))
    with pytest.raises(UnsupportedCache, match="3 positions after dropping the last of 5"):
        PrefixCache.from_output(legacy(5), 5)


@pytest.mark.parametrize("cache,n,message", [
    (legacy(5), 6, "is not"),
    ((("not a tensor",),), 3, "holds a str"),
    ({"odd": 1}, 3, "not supported"),
    (legacy(1), 1, "one-token prompt"),
])
def test_caches_that_are_not_understood_are_refused(cache, n, message):
    with pytest.raises(UnsupportedCache, match=message):
        PrefixCache.from_output(cache, n)
