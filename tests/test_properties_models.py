"""Property tests of the model side: random tiny configs, key/value replay, fast
indirect effect, and the tracer against baukit's.

Profiles: FVKIT_HYPOTHESIS_PROFILE=ci (default, quick) or long (tests/conftest.py).
The baukit comparison runs when FVKIT_BAUKIT names a baukit checkout (the folder
holding baukit/), as the parity suite's --baukit does.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("hypothesis", reason="hypothesis (the `test` extra) is not installed")

from hypothesis import given, strategies as st  # noqa: E402

from fvkit.fast.indirect_effect import FAST_VS_EXACT_REL_TOL, fast_trial, relative_drift  # noqa: E402
from fvkit.method.fixed_trials import FixedTrials  # noqa: E402
from fvkit.method.indirect_effect import TrialSetup, exact_trial  # noqa: E402
from fvkit.method.prompts import DEFAULT_TEMPLATE  # noqa: E402
from fvkit.method.token_labels import dummy_token_labels  # noqa: E402
from fvkit.models import adapters  # noqa: E402
from fvkit.models.config import dims_from_config  # noqa: E402
from fvkit.models.loader import resolve_all_layers  # noqa: E402
from fvkit.models.spec import find_spec, get_spec  # noqa: E402
from fvkit.models.tracer import TraceDict, first_tensor  # noqa: E402
from fvkit.models.zoo import ZOO  # noqa: E402

TINY = [alias for alias, entry in ZOO.items() if entry.source == "random"]
#: Vocabulary of the random-config models: small, their embeddings are not under test.
RANDOM_VOCAB = 97


@st.composite
def tiny_configs(draw):
    """(zoo alias, config kwargs, (n_layers, n_heads, head_dim)) with random geometry
    in the family of that alias (grouped-query where the architecture has it)."""
    alias = draw(st.sampled_from(TINY))
    cfg = dict(ZOO[alias].config)
    n_layers = draw(st.integers(1, 3))
    has_kv = "num_key_value_heads" in cfg
    n_kv = draw(st.integers(1, 2)) if has_kv else None
    n_heads = (n_kv * draw(st.integers(1, 3))) if has_kv else draw(st.integers(1, 4))
    head_dim = draw(st.sampled_from([4, 8]))
    hidden = n_heads * head_dim
    if "head_dim" in cfg:            # explicit head_dim: the hidden size may differ from heads x head_dim
        cfg["head_dim"] = head_dim
        hidden += draw(st.sampled_from([0, 4]))
    for key in ("num_hidden_layers", "n_layer", "max_window_layers"):
        if key in cfg:
            cfg[key] = n_layers
    for key in ("num_attention_heads", "n_head"):
        if key in cfg:
            cfg[key] = n_heads
    for key in ("hidden_size", "n_embd"):
        if key in cfg:
            cfg[key] = hidden
    if has_kv:
        cfg["num_key_value_heads"] = n_kv
    if "rotary_dim" in cfg:
        cfg["rotary_dim"] = head_dim // 2
    cfg["vocab_size"] = RANDOM_VOCAB
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in cfg:
            cfg[key] = 0
    return alias, cfg, (n_layers, n_heads, head_dim)


@given(case=tiny_configs(), seed=st.integers(0, 2**16))
def test_random_tiny_configs_resolve_with_their_spec(case, seed):
    from transformers import AutoConfig, AutoModelForCausalLM

    alias, cfg, (n_layers, n_heads, head_dim) = case
    entry = ZOO[alias]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(entry.model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    # The spec chosen from the architecture alone is the zoo's spec for it.
    spec = find_spec("", [type(model).__name__])
    assert spec.name == get_spec(entry.spec).name
    dims = dims_from_config(config, spec)
    assert (dims.n_layers, dims.n_heads, dims.head_dim) == (n_layers, n_heads, head_dim)
    resolve_all_layers(model, spec, dims)
    outs = [adapters.out_proj_name(spec, layer) for layer in range(n_layers)]
    blocks = [adapters.block_name(spec, layer) for layer in range(n_layers)]
    ids = torch.randint(1, RANDOM_VOCAB, (1, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), TraceDict(model, outs + blocks, retain_input=True) as traces:
        model(input_ids=ids)
    assert not traces.not_fired
    assert all(trace.fired == 1 for trace in traces.values())
    for name in outs:
        assert tuple(traces[name].input.shape)[-2:] == (7, n_heads * head_dim), name
    for name in blocks:
        assert first_tensor(traces[name].output).shape[-1] == dims.hidden_size, name


@functools.lru_cache(maxsize=None)
def random_trials(n_shots: int, seed: int):
    from fvkit.method.data import load_task_dataset

    ds = load_task_dataset("antonym")
    return ds, FixedTrials.make(ds, 1, n_shots, seed)


@given(alias=st.sampled_from(TINY), n_shots=st.integers(1, 5), seed=st.integers(0, 10_000),
       scale=st.sampled_from([0.5, 1.0, 2.0]), strategy=st.sampled_from(["auto", "blocks", "model"]))
def test_replayed_last_token_equals_a_full_forward(zoo_model, alias, n_shots, seed, scale, strategy):
    """Random prompts (trials drawn with a random seed and shot count) and random head
    values: the key/value replay of the last token gives the exact path's effects."""
    lm = zoo_model(alias)
    ds, trials = random_trials(n_shots, seed)
    dummy = dummy_token_labels(n_shots, lm.tokenizer, lm.spec.prepend_bos, lm.spec.bos_text)
    setup = TrialSetup.build(lm, ds, trials, 0, dummy, DEFAULT_TEMPLATE)
    dims = lm.dims
    mean = scale * torch.randn(dims.n_layers, dims.n_heads, len(dummy), dims.head_dim,
                               generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        exact = exact_trial(lm, setup, mean)
        fast = fast_trial(lm, setup, mean, strategy=strategy)
    assert exact.abs().max() > 0
    assert relative_drift(fast, exact) <= FAST_VS_EXACT_REL_TOL, (alias, strategy)


def baukit_nethook():
    """baukit's nethook.py, loaded on its own: the package's __init__ also imports
    widget and image modules (torchvision, IPython) that TraceDict does not need."""
    path = os.environ.get("FVKIT_BAUKIT")
    nethook = Path(path or "") / "baukit" / "nethook.py"
    if not path or not nethook.is_file():
        pytest.skip("FVKIT_BAUKIT does not name a baukit checkout (the folder holding baukit/nethook.py)")
    name = "fvkit_test_baukit_nethook"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, nethook)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


@given(alias=st.sampled_from(TINY), seed=st.integers(0, 10_000), retain_input=st.booleans(),
       edit=st.booleans())
def test_tracer_matches_baukit_trace_dict(zoo_model, alias, seed, retain_input, edit):
    baukit = baukit_nethook()
    lm = zoo_model(alias)
    names = [adapters.out_proj_name(lm.spec, layer) for layer in range(lm.dims.n_layers)]
    names += [adapters.block_name(lm.spec, layer) for layer in range(lm.dims.n_layers)]
    ids = torch.randint(1, 200, (1, 6), generator=torch.Generator().manual_seed(seed))
    shift = torch.randn(lm.dims.hidden_size, generator=torch.Generator().manual_seed(seed + 1))

    def add_to_blocks(output, module_name):
        if module_name not in names[lm.dims.n_layers:]:
            return output
        tensor = first_tensor(output) + shift
        return (tensor, *output[1:]) if isinstance(output, tuple) else tensor

    options = dict(retain_input=retain_input, retain_output=True)
    # Each tracer passes the module's name under its own keyword (fvkit: name, baukit: layer).
    ours_options = dict(options, edit_output=lambda output, name: add_to_blocks(output, name)) if edit else options
    their_options = dict(options, edit_output=lambda output, layer: add_to_blocks(output, layer)) if edit else options
    with torch.no_grad():
        with TraceDict(lm.model, names, **ours_options) as ours:
            ours_logits = lm.model(input_ids=ids).logits
        with baukit.TraceDict(lm.model, names, **their_options) as theirs:
            their_logits = lm.model(input_ids=ids).logits
    assert torch.equal(ours_logits, their_logits)
    for name in names:
        assert torch.equal(first_tensor(ours[name].output), first_tensor(theirs[name].output)), name
        if retain_input:
            assert torch.equal(first_tensor(ours[name].input), first_tensor(theirs[name].input)), name
