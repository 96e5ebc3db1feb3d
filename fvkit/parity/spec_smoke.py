"""Gate M5's model checks: a spec resolves on a model and its hooks see the forward pass.

    paths = resolve_spec_paths(lm)       # every layer's block / attention / out-projection, widths checked
    facts = forward_hook_smoke(lm)       # hooks fire once per forward; an injected vector moves the logits

Each check raises :class:`SmokeFailure` with a sentence naming the module path
and what was expected, so a wrong spec is fixed from the message alone.
"""

from __future__ import annotations

import torch

from fvkit.errors import SpecError
from fvkit.method.intervene import inject
from fvkit.method.run_defaults import default_edit_layer
from fvkit.models import adapters
from fvkit.models.hook_check import HOOK_CHECK_PROMPT, check_forward_hooks


class SmokeFailure(AssertionError):
    """A spec or hook check failed; the message says where."""


def resolve_spec_paths(lm) -> dict:
    """Resolve every module the pipeline touches; check the widths the spec implies."""
    model, spec, dims = lm.model, lm.spec, lm.dims
    blocks = adapters.resolve_blocks(model, spec)
    if len(blocks) != dims.n_layers:
        raise SmokeFailure(f"{spec.blocks_path} holds {len(blocks)} blocks, the config says {dims.n_layers} layers")
    layers = []
    for layer in range(dims.n_layers):
        adapters.resolve_attn(model, spec, layer)
        out_proj = adapters.resolve_out_proj(model, spec, layer)
        width = adapters.out_proj_in_features(out_proj)
        if width != dims.attn_width:
            raise SmokeFailure(f"{adapters.out_proj_name(spec, layer)} reads {width} features, expected "
                               f"n_heads*head_dim = {dims.n_heads}*{dims.head_dim} = {dims.attn_width}")
        layers.append({"layer": layer, "out_proj": adapters.out_proj_name(spec, layer),
                       "class": type(out_proj).__name__, "in_features": width})
    adapters.resolve_final_norm(model, spec)
    adapters.resolve_lm_head(model, spec)
    return {"spec": spec.name, "n_layers": dims.n_layers, "n_heads": dims.n_heads, "head_dim": dims.head_dim,
            "hidden_size": dims.hidden_size, "layers": layers}


def forward_hook_smoke(lm, prompt: str = HOOK_CHECK_PROMPT) -> dict:
    """The hook smoke pass (:mod:`fvkit.models.hook_check`), then an injection at the default edit layer."""
    model, spec, dims = lm.model, lm.spec, lm.dims
    try:
        seen = check_forward_hooks(lm, prompt)
    except SpecError as err:
        raise SmokeFailure(str(err)) from None
    inputs, clean = seen.inputs, seen.logits

    layer = default_edit_layer(dims.n_layers)
    with torch.no_grad():
        with inject(lm, layer, torch.zeros(dims.hidden_size)):
            zero = model(**inputs).logits
        # One unit per hidden dimension: far above rounding, small enough to stay finite.
        with inject(lm, layer, torch.ones(dims.hidden_size)):
            pushed = model(**inputs).logits
    if not torch.equal(zero, clean):
        raise SmokeFailure(f"adding a zero vector at {adapters.block_name(spec, layer)} changed the logits "
                           f"(max {float((zero - clean).abs().max()):.3g}); the hook alters the block's output")
    change = float((pushed[0, -1] - clean[0, -1]).abs().max())
    if not change > 0:
        raise SmokeFailure(f"adding a vector at {adapters.block_name(spec, layer)} left the last logits unchanged; "
                           f"the edited output never reaches the model")
    return {"n_tokens": seen.n_tokens, "hooks": seen.n_hooks, "injection_layer": layer,
            "injection_logit_change": change}
