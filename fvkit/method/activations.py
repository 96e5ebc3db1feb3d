"""Mean attention-head activations (gate M2).

    mean = mean_head_activations(lm, dataset, trials)   # (n_layers, n_heads, n_slots, head_dim)

For each trial prompt, the input of every layer's attention out-projection is
read, split by head and mapped onto the dummy single-token slots (the tokens of
a multi-token demonstration word averaged into its slot); the result is the
mean over trials.
"""

from __future__ import annotations

import torch

from fvkit.models import adapters
from fvkit.errors import FvkitError
from fvkit.progress import progress
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.stage_inputs import n_used, trial_prompt
from fvkit.method.token_labels import dummy_token_labels, slot_index_map, token_meta_labels
from fvkit.models.tracer import StopBefore, TraceDict

STAGE = "mean_activations"


def split_heads(x: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """(..., n_heads * head_dim) -> (..., n_heads, head_dim), checking the width first."""
    if x.shape[-1] != n_heads * head_dim:
        raise FvkitError(
            f"out-projection input has width {x.shape[-1]}, expected n_heads*head_dim = "
            f"{n_heads}*{head_dim}; the spec's out_proj path or the model's head dims are wrong"
        )
    return x.view(*x.shape[:-1], n_heads, head_dim)


def skip_output_head(lm) -> StopBefore:
    """End forward passes in front of the output head, for passes that only read activations.

    The logits of a whole prompt, ``(rows, tokens, vocabulary)``, are the largest
    tensor of a pass (about 20 MB for 100 tokens and a 50k vocabulary) and the
    output head a large part of its work; everything read inside the blocks is
    computed exactly as before. A model whose forward never calls the spec's
    output head simply runs to the end.
    """
    return StopBefore(adapters.resolve_lm_head(lm.model, lm.spec))


def head_inputs(lm, inputs) -> torch.Tensor:
    """Out-projection inputs of every layer for one prompt: (n_layers, n_heads, n_tokens, head_dim)."""
    names = [adapters.out_proj_name(lm.spec, layer) for layer in range(lm.dims.n_layers)]
    with TraceDict(lm.model, names, retain_input=True, retain_output=False) as td, skip_output_head(lm):
        lm.model(**inputs)
    if td.not_fired:
        raise FvkitError(f"hooks on {td.not_fired} never ran; the spec's out-projection path is not on the forward path")
    # Layers may run on different devices and in half precision: the stack is kept on the
    # CPU in float32, where the means are taken (a no-op for a float32 CPU model).
    per_layer = [split_heads(td[n].input.to(device="cpu", dtype=torch.float32), lm.dims.n_heads, lm.dims.head_dim)
                 for n in names]
    return torch.vstack(per_layer).permute(0, 2, 1, 3)


def to_slots(stack: torch.Tensor, idx_map: dict, idx_avg: dict, n_slots: int) -> torch.Tensor:
    """Token axis (dim 2) onto dummy slots, multi-token words averaged."""
    if len(idx_map) != n_slots:
        raise FvkitError(
            f"a prompt's {len(idx_map)} word slots do not line up with the {n_slots} slots of the "
            f"single-token layout; the template's separators tokenize differently in context"
        )
    slots = stack[:, :, list(idx_map.keys())]
    for lo, hi in idx_avg.values():
        slots[:, :, idx_map[lo]] = stack[:, :, lo:hi + 1].mean(axis=2)
    return slots


def mean_head_activations(lm, dataset, trials, template: Template = DEFAULT_TEMPLATE,
                          max_trials=None, show_progress: bool = True) -> torch.Tensor:
    dims, tok = lm.dims, lm.tokenizer
    n = n_used(trials.n_items(STAGE), max_trials)
    dummy = dummy_token_labels(trials.n_shots, tok, lm.spec.prepend_bos, lm.spec.bos_text, template)
    storage = torch.zeros(n, dims.n_layers, dims.n_heads, len(dummy), dims.head_dim)
    with torch.no_grad():
        for t in progress(range(n), desc="mean activations", enabled=show_progress):
            data, _ = trial_prompt(lm, dataset, trials, STAGE, t, template)
            labels, text = token_meta_labels(data, tok, lm.spec.prepend_bos)
            inputs = tok([text], return_tensors="pt")
            idx_map, idx_avg = slot_index_map(labels, dummy)
            storage[t] = to_slots(head_inputs(lm, inputs), idx_map, idx_avg, len(dummy))
    return storage.mean(dim=0)
