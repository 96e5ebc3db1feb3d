"""Cutting a prompt's cache back by one token and copying it into rows."""

import pytest
import torch

from fvkit.errors import FvkitError
from fvkit.kv_cache import PrefixCache, UnsupportedCache


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
    prefix = PrefixCache.from_output(cache, n)
    copy = prefix.take(4)
    assert copy.get_seq_length() == n - 1
    last = prefix.take(2, reuse=True)
    assert last.get_seq_length() == n - 1
    with pytest.raises(FvkitError, match="already handed over"):
        prefix.take(1)


@pytest.mark.parametrize("cache,n,message", [
    (legacy(5), 6, "is not"),
    ((("not a tensor",),), 3, "holds a str"),
    ({"odd": 1}, 3, "not supported"),
    (legacy(1), 1, "one-token prompt"),
])
def test_caches_that_are_not_understood_are_refused(cache, n, message):
    with pytest.raises(UnsupportedCache, match=message):
        PrefixCache.from_output(cache, n)
