"""Resolve a ModelSpec's dotted paths on a live model.

    blocks = resolve_blocks(model, spec)
    o_proj = resolve_out_proj(model, spec, layer=3)
    name = out_proj_name(spec, layer=3)       # 'model.layers.3.self_attn.o_proj'

A wrong path fails at once with the path that failed, the part that did
resolve, and the child module names available there, so a new spec can be
fixed from the message alone.
"""

from __future__ import annotations

import torch

from fvkit.errors import SpecError
from fvkit.models.spec import ModelSpec


def get_submodule(root: torch.nn.Module, path: str, *, spec: ModelSpec, field: str) -> torch.nn.Module:
    """Follow ``path`` from ``root`` one component at a time, failing with context.

    A path with alternatives (``'embed_out|lm_head'``) resolves to the first one
    that exists; when none does, the error names the first alternative's failure
    and lists all of them.
    """
    alternatives = path.split("|")
    if len(alternatives) > 1:
        for alternative in alternatives:
            try:
                return _follow(root, alternative, spec=spec, field=field)
            except SpecError:
                continue
        try:
            _follow(root, alternatives[0], spec=spec, field=field)
        except SpecError as err:
            raise SpecError(f"{err} (none of the alternatives {alternatives} resolves)") from None
    return _follow(root, path, spec=spec, field=field)


def _follow(root: torch.nn.Module, path: str, *, spec: ModelSpec, field: str) -> torch.nn.Module:
    module = root
    done = []
    for part in path.split("."):
        children = dict(module.named_children())
        if part not in children:
            where = ".".join(done) or "<model root>"
            avail = ", ".join(children) or "(no children)"
            raise SpecError(
                f"ModelSpec '{spec.name}': {field}='{path}' does not resolve on "
                f"{type(root).__name__}: '{part}' is not a child of '{where}' "
                f"({type(module).__name__}); children there: {avail}. "
                f"Fix the spec's {field}, or pass --model-spec with the right spec"
            )
        module = children[part]
        done.append(part)
    return module


def resolve_blocks(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.ModuleList:
    blocks = get_submodule(model, spec.blocks_path, spec=spec, field="blocks_path")
    if not isinstance(blocks, (torch.nn.ModuleList, torch.nn.Sequential)) or len(blocks) == 0:
        raise SpecError(
            f"ModelSpec '{spec.name}': blocks_path='{spec.blocks_path}' resolves to "
            f"{type(blocks).__name__}, not a non-empty list of decoder blocks"
        )
    return blocks


def check_layer(model: torch.nn.Module, spec: ModelSpec, layer: int) -> int:
    n = len(resolve_blocks(model, spec))
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise SpecError(f"layer {layer} is out of range for this model: valid layers are 0..{n - 1}")
    return layer


def resolve_block(model: torch.nn.Module, spec: ModelSpec, layer: int) -> torch.nn.Module:
    check_layer(model, spec, layer)
    return resolve_blocks(model, spec)[layer]


def resolve_attn(model: torch.nn.Module, spec: ModelSpec, layer: int) -> torch.nn.Module:
    block = resolve_block(model, spec, layer)
    return get_submodule(block, spec.attn_path_in_block, spec=spec, field="attn_path_in_block")


def resolve_out_proj(model: torch.nn.Module, spec: ModelSpec, layer: int) -> torch.nn.Module:
    attn = resolve_attn(model, spec, layer)
    return get_submodule(attn, spec.out_proj_path_in_attn, spec=spec, field="out_proj_path_in_attn")


def resolve_attn_output_norm(model: torch.nn.Module, spec: ModelSpec, layer: int):
    """The norm a block applies to its attention output (``spec.attn_output_norm``), or None
    where the spec declares none."""
    if spec.attn_output_norm is None:
        return None
    block = resolve_block(model, spec, layer)
    return get_submodule(block, spec.attn_output_norm, spec=spec, field="attn_output_norm")


def resolve_final_norm(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    return get_submodule(model, spec.final_norm_path, spec=spec, field="final_norm_path")


def resolve_lm_head(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    return get_submodule(model, spec.lm_head_path, spec=spec, field="lm_head_path")


def block_name(spec: ModelSpec, layer: int) -> str:
    return f"{spec.blocks_path}.{layer}"


def attn_name(spec: ModelSpec, layer: int) -> str:
    return f"{block_name(spec, layer)}.{spec.attn_path_in_block}"


def out_proj_name(spec: ModelSpec, layer: int) -> str:
    return f"{attn_name(spec, layer)}.{spec.out_proj_path_in_attn}"


def attn_output_norm_name(spec: ModelSpec, layer: int):
    """Dotted name of ``layer``'s attention-output norm, or None where the spec declares none."""
    return None if spec.attn_output_norm is None else f"{block_name(spec, layer)}.{spec.attn_output_norm}"


def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): its weight is stored (in, out), nn.Linear's (out, in)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def out_proj_in_features(module: torch.nn.Module) -> int:
    """Input width of an out-projection: nn.Linear stores (out, in), GPT-2's Conv1D (in, out)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return module.weight.shape[0]
    if hasattr(module, "in_features"):
        return int(module.in_features)
    raise SpecError(f"cannot tell the input width of out-projection {type(module).__name__}")
