"""Gate M5's model checks: a spec resolves on a model and its hooks see the forward pass.

    paths = resolve_spec_paths(lm)       # every layer's block / attention / out-projection, widths checked
    facts = forward_hook_smoke(lm)       # hooks fire once per forward; an injected random vector moves the logits
    bos_policy_smoke(lm)                 # the tokenizer adds BOS exactly when the spec says it does

Each check raises :class:`SmokeFailure` with a sentence naming the module path
and what was expected, so a wrong spec is fixed from the message alone.
"""

from __future__ import annotations

import torch

from fvkit.errors import SpecError
from fvkit.method.intervene import inject
from fvkit.method.run_defaults import default_edit_layer
from fvkit.models import adapters
from fvkit.models.bos_policy import check_bos_policy
from fvkit.models.hook_check import HOOK_CHECK_PROMPT, check_forward_hooks


#: Seed of the injected direction: one fixed draw, so a run's measured change is repeatable.
INJECTION_SEED = 0

#: The least change of the last token's logits (largest absolute difference) that counts as
#: "the injected vector reached the output". A vector as long as the residual stream itself
#: moved the logits by 9.1 to 11.8 on every zoo model (tiny-gpt2 10.9, tiny-llama 9.3,
#: tiny-gptj 9.4, tiny-neox 9.7, tiny-gemma 10.2, tiny-olmo 10.8, tiny-mistral 9.9,
#: tiny-qwen2 9.1, tiny-gemma-hd 10.4, smollm2-135m 11.8), while an edit the model cancels
#: moves them by float noise only (an all-ones vector, removed by the next LayerNorm, moved
#: gpt2/gptj/neox/olmo logits by 3e-6 to 4e-6). One logit is nine times below the smallest
#: real change and five orders of magnitude above the noise.
MIN_INJECTION_LOGIT_CHANGE = 1.0


def injection_vector(hidden_size: int, norm: float, seed: int = INJECTION_SEED) -> torch.Tensor:
    """A fixed random direction scaled to ``norm``.

    A constant vector (all ones) lies along the direction LayerNorm removes (the mean),
    so it never reaches the logits; a random direction has almost all of its length off
    that axis. Scaled to the residual stream's own norm it is a change the model must
    feel, however large or small that model's activations are.
    """
    direction = torch.randn(hidden_size, generator=torch.Generator().manual_seed(seed))
    return direction * (norm / float(direction.norm()))


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
    vector = injection_vector(dims.hidden_size, seen.residual_norms[layer])
    with torch.no_grad():
        with inject(lm, layer, torch.zeros(dims.hidden_size)):
            zero = model(**inputs).logits
        with inject(lm, layer, vector):
            pushed = model(**inputs).logits
    block = adapters.block_name(spec, layer)
    if not torch.equal(zero, clean):
        raise SmokeFailure(f"adding a zero vector at {block} changed the logits "
                           f"(max {float((zero - clean).abs().max()):.3g}); the hook alters the block's output")
    change = float((pushed[0, -1] - clean[0, -1]).abs().max())
    if not change >= MIN_INJECTION_LOGIT_CHANGE:
        raise SmokeFailure(
            f"adding a random vector of the residual stream's norm ({seen.residual_norms[layer]:.3g}) at {block} "
            f"moved the last logits by {change:.3g}, below the minimum {MIN_INJECTION_LOGIT_CHANGE:g}; the edited "
            f"output does not reach the logits (a module that drops or normalises it away), so the spec's "
            f"blocks_path is not where the function vector must be added")
    return {"n_tokens": seen.n_tokens, "hooks": seen.n_hooks, "injection_layer": layer,
            "injection_norm": seen.residual_norms[layer], "injection_logit_change": change}


def bos_policy_smoke(lm) -> dict:
    """The BOS policy check of ``fvkit resolve`` and ``fvkit run`` (:mod:`fvkit.models.bos_policy`)."""
    try:
        check_bos_policy(lm)
    except SpecError as err:
        raise SmokeFailure(str(err)) from None
    return {"prepend_bos": lm.spec.prepend_bos, "bos_text": lm.spec.bos_text}
