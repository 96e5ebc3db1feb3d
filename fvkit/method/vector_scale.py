"""How large the function vector is against the residual stream it is added to.

    norms = residual_norms(lm, dataset, trials, edit_layer)     # one per evaluation prompt
    scale = vector_scale(fv, norms, edit_layer)                 # {"ratio": 0.0057, ...}
    warn_if_negligible(scale, "the reference-defined vector")  # InjectionWarning below 1%

The residual stream is measured where the injection adds the vector: the output
hidden state of block ``edit_layer`` at the last token, in a clean pass (no
vector) over every zero-shot and shuffled-label evaluation prompt; its L2 norm
is averaged over those prompts. A vector far smaller than that stream cannot
change what the model predicts, and its evaluation then reports no effect that
says nothing about the heads: on gemma3-270m the reference-defined vector is
about 0.6% of the stream at layer 9 and leaves zero-shot accuracy at 0.
"""

from __future__ import annotations

import warnings

import torch

from fvkit.errors import InjectionWarning
from fvkit.method.intervene import EVAL_STAGES
from fvkit.method.prompts import DEFAULT_TEMPLATE, Template
from fvkit.method.stage_inputs import n_used, trial_prompt
from fvkit.models import adapters
from fvkit.models.tracer import Trace, first_tensor

#: Below this share of the residual stream's norm an added vector is treated as one
#: that cannot matter: 1% of the stream moves a normalised hidden state by about 1% of
#: its length, far less than the gap between a trained model's top logits.
MIN_VECTOR_TO_RESIDUAL = 0.01

#: What every report says about how the ratio was measured.
MEASURED_ON = ("L2 norm of the vector / mean L2 norm of the output of block {layer} at the last token, "
               "in clean passes over the {n} zero-shot and shuffled-label evaluation prompts")


def residual_norms(lm, dataset, trials, layer: int, template: Template = DEFAULT_TEMPLATE,
                   max_items=None) -> list:
    """L2 norm of block ``layer``'s output at the last token of each evaluation prompt (no vector)."""
    adapters.check_layer(lm.model, lm.spec, layer)
    name = adapters.block_name(lm.spec, layer)
    norms = []
    with torch.no_grad():
        for stage in EVAL_STAGES:
            for j in range(n_used(trials.n_items(stage), max_items)):
                _, text = trial_prompt(lm, dataset, trials, stage, j, template)
                inputs = lm.tokenizer([text], return_tensors="pt")
                with Trace(lm.model, name) as trace:
                    lm.model(**inputs)
                hidden = first_tensor(trace.output)
                norms.append(hidden[0, -1].float().norm().item())
    return norms


def vector_scale(vector: torch.Tensor, norms: list, layer: int) -> dict:
    """The vector's norm, the residual stream's mean norm and their ratio, with how they were measured."""
    vector_norm = vector.float().norm().item()
    residual = sum(norms) / len(norms) if norms else float("nan")
    ratio = vector_norm / residual if residual > 0 else float("inf")
    return {
        "vector_norm": vector_norm,
        "residual_norm": residual,
        "ratio": ratio,
        "edit_layer": layer,
        "n_prompts": len(norms),
        "negligible": ratio < MIN_VECTOR_TO_RESIDUAL,
        "threshold": MIN_VECTOR_TO_RESIDUAL,
        "measured": MEASURED_ON.format(layer=layer, n=len(norms)),
    }


def negligible_text(scale: dict, what: str) -> str:
    """The warning line reports show when ``scale`` is below MIN_VECTOR_TO_RESIDUAL."""
    return (f"{what} has norm {scale['vector_norm']:.4g}, {scale['ratio']:.3%} of the residual stream's "
            f"{scale['residual_norm']:.4g} at layer {scale['edit_layer']} (below "
            f"{MIN_VECTOR_TO_RESIDUAL:.0%}): an injection this small cannot change the predictions, "
            f"so its evaluation shows no effect whatever the heads do")


def warn_if_negligible(scale: dict, what: str) -> bool:
    """Issue an InjectionWarning when the vector is below MIN_VECTOR_TO_RESIDUAL of the stream."""
    if scale["negligible"]:
        warnings.warn(InjectionWarning(negligible_text(scale, what)), stacklevel=2)
    return scale["negligible"]
