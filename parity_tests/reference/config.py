"""MODEL_CONFIG: the one place where fvkit's model description becomes the reference's.

The reference derives its config inside ``load_gpt_model_and_tokenizer`` from a
hub name; its stage functions read ``n_heads``, ``n_layers``, ``resid_dim``,
``attn_hook_names``, ``layer_hook_names``, ``prepend_bos`` and branch on
substrings of ``name_or_path``. Here the config is built from the ModelSpec and
the model's dimensions, and the branch is picked by module layout from the
reference branches the registered architectures name
(:func:`fvkit.models.architectures.reference_branches`: blocks path, attention
path, out-projection path -> branch name, Conv1D or Linear, and whether the
branch applies the out-projection's bias after patching a head). Every bridge
is recorded as a sentence, and what the reference cannot compute faithfully for
the model is marked unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fvkit.models.adapters import block_name, is_conv1d, out_proj_name, resolve_out_proj
from fvkit.models.architectures import reference_branches

from .keys import M1_KEY, RESULT_STAGES, STAGE_NEEDS

#: The BOS text the reference writes into prompts when the tokenizer adds none
#: (hard-coded in its ``word_pairs_to_prompt_data``).
REFERENCE_BOS_TEXT = "<|endoftext|>"
#: name_or_path for a layout no reference branch serves; it contains none of the
#: substrings the reference branches on.
NO_BRANCH_NAME = "fvkit-unsupported-layout"


@dataclass
class ReferenceConfig:
    """The reference's MODEL_CONFIG for one loaded model, with what it took to build it."""

    model_config: dict
    normalizations: list
    unsupported: dict          # result key -> reason
    branch: Optional[str]
    #: MODEL_CONFIG given to the evaluations (n_shot_eval and the injection probe). It
    #: differs from ``model_config`` only in resid_dim, where n_heads*head_dim != hidden_size.
    eval_config: Optional[dict] = None

    def __post_init__(self):
        if self.eval_config is None:
            self.eval_config = self.model_config


def _mark(unsupported: dict, keys, reason: str) -> None:
    for key in keys:
        unsupported.setdefault(key, reason)


#: Result keys a caller may supply in place of the reference's own: the function vector,
#: which the reference's evaluations then inject (``run_reference(injected_vector=...)``).
SUPPLIABLE = ("function_vector",)


def propagate_unsupported(unsupported: dict, supplied=()) -> dict:
    """Make every stage that needs an unsupported stage unsupported too, naming the root cause.
    A need in ``supplied`` (see :data:`SUPPLIABLE`) is met by the caller's value instead."""
    roots = dict(unsupported)
    for key, needs in STAGE_NEEDS.items():  # listed in pipeline order, so one pass suffices
        if key in unsupported:
            continue
        for need in needs:
            if need in unsupported and need not in supplied:
                unsupported[key] = f"needs {need}, which is unsupported: {roots[need]}"
                roots[key] = roots[need]
                break
    return unsupported


def _base_notes(spec, dims, n_layers: int, n_heads: int) -> list:
    return [
        f"MODEL_CONFIG built from ModelSpec '{spec.name}' and the model's dimensions instead of the "
        f"reference's load_gpt_model_and_tokenizer (which only knows hub names): n_heads={n_heads}, "
        f"n_layers={n_layers}, "
        + (f"resid_dim=hidden_size={dims.hidden_size}" if n_heads * int(dims.head_dim) == int(dims.hidden_size)
           else "resid_dim per stage (below)")
        + f", prepend_bos={spec.prepend_bos}",
        f"attn_hook_names = {spec.blocks_path}.{{L}}.{spec.attn_path_in_block}."
        f"{spec.out_proj_path_in_attn}; layer_hook_names = {spec.blocks_path}.{{L}} (from the spec's paths)",
        "the model and tokenizer are the ones fvkit loaded, used as they are (the reference's loader, "
        "its dtype choice and its pad_token=eos setting are not applied; prompts are single, unpadded)",
    ]


def _no_branch(spec, name: str, branches: dict, notes: list, unsupported: dict) -> None:
    known = "; ".join(f"{'.'.join(k)} -> '{v['name']}'" for k, v in branches.items())
    reason = (f"no reference branch has the module layout {spec.blocks_path}.{{L}}."
              f"{spec.attn_path_in_block}.{spec.out_proj_path_in_attn} (its branches: {known})")
    _mark(unsupported, ("indirect_effect", "function_vector"), reason)
    notes.append(f"name_or_path='{name}': {reason}")


def _branch_fit(model, spec, layout: tuple, branch: dict, notes: list, unsupported: dict) -> None:
    """Whether the model's out-projection is the kind (Conv1D or Linear, bias or not)
    the branch's projection code assumes after patching a head."""
    name = branch["name"]
    out_proj = resolve_out_proj(model, spec, 0)
    has_bias = getattr(out_proj, "bias", None) is not None
    conv = is_conv1d(out_proj)
    notes.append(
        f"name_or_path='{name}' selects the reference's '{name}' branch, which has this module layout "
        f"({'.'.join(layout)}; out-projection {type(out_proj).__name__}, "
        f"{'with' if has_bias else 'without'} bias)"
    )
    if conv != branch["conv1d"]:
        _mark(unsupported, ("indirect_effect",),
              f"the reference's '{name}' branch expects a {'Conv1D' if branch['conv1d'] else 'Linear'} "
              f"out-projection, this model has {type(out_proj).__name__}")
    if has_bias and not branch["bias"]:
        _mark(unsupported, ("indirect_effect",),
              f"the out-projection has a bias, which the reference's '{name}' branch leaves out when it "
              f"recomputes the projection after patching a head, so its indirect effects would drift")
    if branch["bias"] and not has_bias:
        _mark(unsupported, ("indirect_effect",),
              f"the reference's '{name}' branch adds the out-projection's bias, which this model lacks")


def head_split_widths(config: dict, dims, n_heads: int, notes: list, unsupported: dict) -> Optional[dict]:
    """Where n_heads*head_dim != hidden_size: the MODEL_CONFIG of the evaluations, or None when
    the widths agree.

    The reference reads resid_dim in three roles (every use in its src/): (1) the width of
    the out-projection's input it splits into heads with ``resid_dim // n_heads``
    (``get_mean_head_activations`` and ``replace_activation_w_avg``, which
    ``compute_indirect_effect`` patches through); (2) the residual stream's width the
    function vector is reshaped to before it is added to a block's output
    (``function_vector_intervention``, reached from ``n_shot_eval``); (3) both at once in
    ``compute_function_vector``, which places a head's mean activation in a resid_dim-wide
    input and adds the out-projection's output to a resid_dim-wide sum. Roles 1 and 2 are
    met honestly by giving each its own width; role 3 cannot be.
    """
    heads_width, hidden = n_heads * int(dims.head_dim), int(dims.hidden_size)
    if heads_width == hidden:
        return None
    config["resid_dim"] = heads_width
    notes.append(
        f"resid_dim = n_heads*head_dim = {n_heads}*{dims.head_dim} = {heads_width} (not hidden_size {hidden}) in the "
        f"MODEL_CONFIG given to get_mean_head_activations, compute_indirect_effect and compute_function_vector: in "
        f"the first two the reference reads resid_dim only to split the out-projection's input "
        f"({heads_width} wide) into heads of resid_dim//n_heads = {dims.head_dim}")
    notes.append(
        f"resid_dim = hidden_size = {hidden} in the MODEL_CONFIG given to n_shot_eval, "
        f"n_shot_eval_no_intervention and the injection probe: there the reference reads resid_dim only to "
        f"reshape the function vector to the residual stream's width ({hidden}) before adding it to a block's "
        f"output")
    _mark(unsupported, ("function_vector",),
          f"reference cannot compute: compute_function_vector puts each head's {dims.head_dim}-wide mean "
          f"activation into a resid_dim-wide input and adds the out-projection's {hidden}-wide output to a "
          f"resid_dim-wide sum, which needs n_heads*head_dim = hidden_size; here {heads_width} != {hidden}, so "
          f"with either width one of the two steps has mismatched shapes")
    return dict(config, resid_dim=hidden)


def _shape_and_bos_checks(spec, unsupported: dict) -> None:
    """BOS text: what the reference hard-codes about every model's prompts."""
    if not spec.prepend_bos and spec.bos_text != REFERENCE_BOS_TEXT:
        reason = (f"spec '{spec.name}' writes BOS text {spec.bos_text!r} but the reference writes the literal "
                  f"{REFERENCE_BOS_TEXT!r}, so every prompt differs")
        _mark(unsupported, (M1_KEY,) + RESULT_STAGES, reason)


def reference_model_config(lm, supplied=()) -> ReferenceConfig:
    """Build the reference's MODEL_CONFIG from ``lm.spec`` and ``lm.dims`` (see the module docstring).
    ``supplied``: result keys the caller provides where the reference cannot (:data:`SUPPLIABLE`)."""
    spec, dims, model = lm.spec, lm.dims, lm.model
    n_layers, n_heads = int(dims.n_layers), int(dims.n_heads)
    unsupported: dict = {}
    layout = (spec.blocks_path, spec.attn_path_in_block, spec.out_proj_path_in_attn)
    branches = reference_branches()
    branch = branches.get(layout)
    name = branch["name"] if branch else NO_BRANCH_NAME
    config = {
        "n_heads": n_heads,
        "n_layers": n_layers,
        "resid_dim": int(dims.hidden_size),
        "name_or_path": name,
        "attn_hook_names": [out_proj_name(spec, i) for i in range(n_layers)],
        "layer_hook_names": [block_name(spec, i) for i in range(n_layers)],
        "prepend_bos": bool(spec.prepend_bos),
    }
    notes = _base_notes(spec, dims, n_layers, n_heads)
    if len(spec.blocks_path.split(".")) != 2:
        _mark(unsupported, ("indirect_effect", "zero_shot", "shuffled"),
              f"the reference reads the layer index as the third dotted component of a hook name, but "
              f"blocks_path '{spec.blocks_path}' puts it elsewhere")
    if branch is None:
        _no_branch(spec, name, branches, notes, unsupported)
    else:
        _branch_fit(model, spec, layout, branch, notes, unsupported)
    eval_config = head_split_widths(config, dims, n_heads, notes, unsupported)
    _shape_and_bos_checks(spec, unsupported)
    return ReferenceConfig(config, notes, propagate_unsupported(unsupported, supplied), name if branch else None,
                           eval_config)
