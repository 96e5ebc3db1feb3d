"""The hook smoke pass: do a spec's modules sit on the model's forward path?

    facts = check_forward_hooks(lm)     # HookPass(n_tokens=12, n_hooks=6, logits=..., residual_norms=[...])

One forward pass with a hook on every layer's decoder block and attention
out-projection. Every hook must fire exactly once, every out-projection must
read ``n_heads * head_dim`` features at every token, every block must return
``hidden_size`` features and the logits must be finite. A spec that points at
a module the forward pass skips, or at the wrong projection, fails here with a
:class:`~fvkit.errors.SpecError` naming the module, before any stage measures
nothing. ``fvkit resolve`` and the parity gate M5 both run this pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fvkit.errors import SpecError
from fvkit.models.tracer import TraceDict, first_tensor

#: The prompt of the pass: short, ASCII and in the Q:/A: format the pipeline uses.
HOOK_CHECK_PROMPT = "Q: hot\nA: cold\n\nQ: up\nA:"


@dataclass
class HookPass:
    """What the pass saw: its inputs and clean logits (for further checks), token and hook counts,
    and each layer's residual-stream norm at the last token (the scale an injected vector needs
    to be felt at that layer)."""

    inputs: dict
    logits: torch.Tensor
    n_tokens: int
    n_hooks: int
    residual_norms: list


def check_forward_hooks(lm, prompt: str = HOOK_CHECK_PROMPT) -> HookPass:
    """Run the pass (see module docstring); raise SpecError at the first gap."""
    spec, dims = lm.spec, lm.dims
    out_projs, blocks = lm.out_proj_names(), lm.block_names()
    text = prompt if spec.prepend_bos else spec.bos_text + prompt
    inputs = lm.tokenizer(text, return_tensors="pt").to(lm.device)
    n_tokens = int(inputs["input_ids"].shape[1])
    with torch.no_grad(), TraceDict(lm.model, out_projs + blocks, retain_input=True) as traces:
        logits = lm.model(**inputs).logits
    if traces.not_fired:
        raise SpecError(
            f"ModelSpec '{spec.name}': hooks on {', '.join(traces.not_fired)} never fired during a "
            f"forward pass of {type(lm.model).__name__}; those modules are not on the model's "
            f"computation path, so the spec points at the wrong modules"
        )
    for name, trace in traces.items():
        if trace.fired != 1:
            raise SpecError(f"ModelSpec '{spec.name}': the hook on {name} ran {trace.fired} times in one forward "
                            f"pass, expected once; the spec points at a module the model reuses")
    for name in out_projs:
        shape = tuple(traces[name].input.shape)
        if shape[-1] != dims.attn_width:
            raise SpecError(
                f"ModelSpec '{spec.name}': {name} received inputs of width {shape[-1]}, not "
                f"n_heads*head_dim = {dims.attn_width}; it is not the attention out-projection"
            )
        if shape[-2] != n_tokens:
            raise SpecError(f"ModelSpec '{spec.name}': {name} input has shape {shape}, expected "
                            f"(..., {n_tokens}, {dims.attn_width}): one row per prompt token")
    for name in blocks:
        shape = tuple(first_tensor(traces[name].output).shape)
        if shape[-1] != dims.hidden_size:
            raise SpecError(f"ModelSpec '{spec.name}': {name} output has shape {shape}, expected hidden size "
                            f"{dims.hidden_size} last; blocks_path does not point at the decoder blocks")
    if not torch.isfinite(logits).all():
        raise SpecError(f"ModelSpec '{spec.name}': the clean forward pass produced non-finite logits")
    norms = [float(first_tensor(traces[name].output)[0, -1].float().norm()) for name in blocks]
    return HookPass(inputs=inputs, logits=logits, n_tokens=n_tokens, n_hooks=len(traces), residual_norms=norms)
