"""Replayed rows' attention on one shared prefix: the model's eager attention, to float32 rounding.

The replay's attention is computed once per key/value head group over the
clean prefix instead of per row over joined, head-repeated copies. It must give
what the model's own eager function gives (checked on every architecture that
has one, in a real replay), it must actually be used where it can be (a counter,
or the speed-up is unproven), and an implementation that differs must be refused
by the first-call check with the model's own numbers returned.
"""

import warnings

import pytest
import torch

from fvkit.fast import prefix_attention
from fvkit.fast.evaluation import clean_pass, edited_rows
from fvkit.fast.prefix_attention import CHECK_REL_TOL, EAGER_FUNCTION, modeling_modules, shared_prefix_attention
from fvkit.models import adapters
from fvkit.models.zoo import TINY_PARITY_MODELS

PROMPT = "Q: hot\nA: cold\n\nQ: up\nA: down\n\nQ: big\nA:"

#: Largest difference from the model's eager attention allowed in the direct comparison,
#: as a fraction of the largest |output|: the same dot products in another shape and the
#: new token's term added last put them a few float32 ulps (1e-7) apart.
ROUNDING_REL_TOL = 1e-6

#: Architectures whose attention calls its modeling module's eager function with the keys and
#: values the cache returned, in transformers 4.49.0 and in the newest release.
CALLS_EAGER_FUNCTION = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-gemma", "tiny-gemma-hd", "tiny-olmo", "tiny-neox")


def _repeat_kv(x, n_rep):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _eager(query, keys, values, mask, scaling, softcap=None):
    """Eager attention as transformers' eager functions compute it (repeat_kv order, fp32 softmax)."""
    group = query.shape[1] // keys.shape[1]
    scores = query @ _repeat_kv(keys, group).transpose(2, 3) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return (weights @ _repeat_kv(values, group)).transpose(1, 2).contiguous()


@pytest.mark.parametrize("n_heads,n_kv,softcap", [(9, 3, None), (4, 4, None), (6, 2, 5.0)])
def test_shared_prefix_attention_equals_eager_attention_on_joined_copies(n_heads, n_kv, softcap):
    g = torch.Generator().manual_seed(0)
    rows, prefix, dim = 5, 11, 8
    query = torch.randn(rows, n_heads, 1, dim, generator=g)
    prefix_k, prefix_v = torch.randn(2, n_kv, prefix, dim, generator=g)
    new_k, new_v = torch.randn(2, rows, n_kv, 1, dim, generator=g)
    mask = torch.zeros(rows, 1, 1, prefix + 1)
    mask[..., 2] = torch.finfo(torch.float32).min  # one masked prefix position
    keys = torch.cat([prefix_k.expand(rows, -1, -1, -1), new_k], dim=-2)
    values = torch.cat([prefix_v.expand(rows, -1, -1, -1), new_v], dim=-2)
    expected = _eager(query, keys, values, mask, 0.3, softcap)
    got, weights = shared_prefix_attention(query, prefix_k, prefix_v, new_k, new_v, mask, 0.3, softcap)
    assert got.shape == expected.shape == (rows, 1, n_heads, dim)
    assert weights.shape == (rows, n_heads, 1, prefix + 1)
    drift = float((got - expected).abs().max() / expected.abs().max())
    assert drift <= ROUNDING_REL_TOL, f"drift {drift:.2e} from eager attention, allowed {ROUNDING_REL_TOL:.0e}"
    # The grouping matters: query head h reads key/value head h // group, not h % n_kv.
    if n_kv not in (1, n_heads):
        shuffled = torch.cat([prefix_k[1:], prefix_k[:1]])
        wrong, _ = shared_prefix_attention(query, shuffled, prefix_v, new_k, new_v, mask, 0.3, softcap)
        assert float((wrong - expected).abs().max() / expected.abs().max()) > 1e-2


def _counting(monkeypatch):
    calls = []
    original = prefix_attention.shared_prefix_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(prefix_attention, "shared_prefix_attention", counted)
    return calls


def _replay(lm, layers):
    vec = torch.randn(lm.dims.hidden_size, generator=torch.Generator().manual_seed(1)) * 5
    inputs = lm.tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        logits, prefix, _ = clean_pass(lm, inputs)
        rows = edited_rows(lm, inputs, prefix, vec, layers)
    return logits, rows


@pytest.mark.parametrize("alias", TINY_PARITY_MODELS)
def test_a_replay_uses_it_where_the_model_has_eager_attention_and_keeps_the_clean_logits(alias, zoo_model,
                                                                                         monkeypatch):
    lm = zoo_model(alias)
    blocks = adapters.resolve_blocks(lm.model, lm.spec)
    monkeypatch.setattr(prefix_attention, "_CHECKED", type(prefix_attention._CHECKED)())
    calls = _counting(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refusal warns: none is expected on the zoo
        logits, rows = _replay(lm, list(range(lm.dims.n_layers)))
    # The clean row of the replay against the whole-prompt pass, whichever attention ran.
    drift = float((rows[-1] - logits[0]).abs().max() / logits.abs().max())
    assert drift <= 1e-5, f"{alias}: replayed clean row {drift:.2e} from the whole-prompt pass"
    if alias not in CALLS_EAGER_FUNCTION:
        if not modeling_modules(blocks):
            assert calls == [], f"{alias} has no {EAGER_FUNCTION}, yet the shared-prefix attention ran"
        pytest.skip(f"{alias}: its attention is not one of those known to call {EAGER_FUNCTION} "
                    f"with the cache's keys in both releases ({len(calls)} blocks used it here)")
    assert len(calls) == lm.dims.n_layers, f"{alias}: ran on {len(calls)} of {lm.dims.n_layers} blocks"
    checked = [m for m in prefix_attention._CHECKED.keys()]
    assert len(checked) == lm.dims.n_layers and all(prefix_attention._CHECKED[m] is True for m in checked)


def test_a_wrong_implementation_is_refused_at_the_check_and_the_models_numbers_kept(zoo_model, monkeypatch):
    lm = zoo_model("tiny-llama")
    monkeypatch.setattr(prefix_attention, "_CHECKED", type(prefix_attention._CHECKED)())
    logits_before, rows_before = _replay(lm, [0, 1])
    monkeypatch.setattr(prefix_attention, "_CHECKED", type(prefix_attention._CHECKED)())
    original = prefix_attention.shared_prefix_attention
    # Forgets the 1/sqrt(d) scale: plausible-looking, wrong attention.
    monkeypatch.setattr(prefix_attention, "shared_prefix_attention",
                        lambda q, pk, pv, nk, nv, mask, scaling, softcap=None: original(q, pk, pv, nk, nv, mask, 1.0, softcap))
    with pytest.warns(UserWarning, match="shared-prefix attention refused"):
        _, rows = _replay(lm, [0, 1])
    assert torch.allclose(rows, rows_before, rtol=0, atol=CHECK_REL_TOL * float(rows_before.abs().max()))
    refused = [prefix_attention.refusal(m) for m in prefix_attention._CHECKED.keys()]
    assert refused and all(r and "differs from" in r for r in refused)


def test_the_models_own_function_is_back_after_the_replay(zoo_model):
    lm = zoo_model("tiny-llama")
    modules = modeling_modules(adapters.resolve_blocks(lm.model, lm.spec))
    before = {m.__name__: getattr(m, EAGER_FUNCTION) for m in modules}
    _replay(lm, [1])
    assert modules and {m.__name__: getattr(m, EAGER_FUNCTION) for m in modules} == before
