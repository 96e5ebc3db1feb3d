"""Whether the reference's function-vector injection does anything on this model (M4 validity).

The reference adds the function vector inside ``add_function_vector``, which edits
``output[0]`` only when a decoder block returns a tuple; from transformers 4.54
(LLaMA family) / 5.3 (GPT-2) blocks return a plain tensor and the edit is silently
skipped. The zero-shot and shuffled intervention numbers are then kept but flagged.
"""

from __future__ import annotations

from typing import Optional

from .loading import ReferenceModules
from .meta import version


def probe_injection(refs: ReferenceModules, lm, model_config: dict, fv, edit_layer: int, sentence: str) -> dict:
    """Two probes at the edit layer: the type the block returns, and whether the
    reference's own ``function_vector_intervention`` moves the logits."""
    model, tokenizer = lm.model, lm.tokenizer
    name = model_config["layer_hook_names"][edit_layer]
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out: seen.__setitem__("type", type(out).__name__ if not isinstance(out, tuple) else "tuple"))
    try:
        inputs = tokenizer([sentence], return_tensors="pt").to(model.device)
        model(**inputs)
    finally:
        handle.remove()
    clean, edited = refs.intervention_utils.function_vector_intervention(
        [sentence], target=[""], edit_layer=edit_layer, function_vector=fv, model=model,
        model_config=model_config, tokenizer=tokenizer, compute_nll=False)
    change = float((edited.float() - clean.float()).abs().max())
    fv_norm = float(fv.float().norm())
    is_tuple = seen.get("type") == "tuple"
    reason = None
    if not is_tuple:
        reason = (f"transformers {version('transformers')}: decoder block '{name}' returns a plain "
                  f"{seen.get('type')}, and the reference's add_function_vector edits only tuple outputs, so its "
                  f"'intervened' logits are the clean logits (max |change| = {change:g})")
    elif change == 0.0 and fv_norm > 0.0:
        reason = (f"the reference's function_vector_intervention left the logits unchanged (max |change| = 0) "
                  f"although block '{name}' returns a tuple and the function vector is nonzero")
    return {"block": name, "block_output_type": seen.get("type"), "max_abs_logit_change": change,
            "function_vector_norm": fv_norm, "invalid_reason": reason}


def probe_zero_shot(refs: ReferenceModules, lm, model_config: dict, fv, edit_layer: int, query_target_pair,
                    prefixes, separators) -> dict:
    """:func:`probe_injection` on the first zero-shot prompt, built as the reference builds it."""
    pu = refs.prompt_utils
    zero_shot_data = pu.word_pairs_to_prompt_data(
        {"input": [], "output": []}, query_target_pair=query_target_pair,
        prepend_bos_token=not model_config["prepend_bos"], prefixes=prefixes, separators=separators)
    return probe_injection(refs, lm, model_config, fv, edit_layer, pu.create_prompt(zero_shot_data))


def invalid_reason(probe: dict) -> Optional[str]:
    """What ``meta["invalid"]`` says about the intervention numbers, or None when they are valid."""
    if not probe["invalid_reason"]:
        return None
    return probe["invalid_reason"] + "; the reference's zero_shot/shuffled intervention numbers are reported " \
                                     "but must not be compared"
