"""The model branches of the function_vectors reference, in the order its code tests them.

These are a property of the reference, not of fvkit: a new architecture either
has the module layout of one of them (and names it as its ``reference_branch``)
or the reference cannot drive it (``reference_branch=None``).
"""

from fvkit.models.architectures.architecture import ReferenceBranch

GPT2_XL = ReferenceBranch("gpt2-xl", ("transformer.h", "attn", "c_proj"), conv1d=True, bias=True)
GPT_J = ReferenceBranch("gpt-j", ("transformer.h", "attn", "out_proj"), conv1d=False, bias=False)
GPT_NEOX = ReferenceBranch("gpt-neox", ("gpt_neox.layers", "attention", "dense"), conv1d=False, bias=True)
LLAMA = ReferenceBranch("llama", ("model.layers", "self_attn", "o_proj"), conv1d=False, bias=False)

#: Every branch, in this order in :func:`fvkit.models.architectures.reference_branches`.
ALL_BRANCHES = (GPT2_XL, GPT_J, GPT_NEOX, LLAMA)
