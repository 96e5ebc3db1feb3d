"""The architecture registry: one file per family, found by looking in this folder.

    all_architectures()              # every Architecture, highest lookup priority first
    get_architecture("gemma")        # one of them, by spec name
    zoo_recipes()["tiny-llama"]      # ZooEntry of every zoo model, in zoo order
    default_parity_models()          # ('tiny-gpt2', ..., 'smollm2-135m', 'gemma3-270m')
    reference_branches()             # {(blocks, attn, out_proj): {"name", "conv1d", "bias"}}
    reference_release("gemma")       # '4.49.0': the transformers release of its reference numbers

Each module here other than the support modules below is a family file: it
defines ``ARCHITECTURE = Architecture(...)`` (see
:mod:`fvkit.models.architectures.architecture`) and is named after its spec.
Adding an architecture is adding such a file (plus the parity snapshots of its
default zoo model); the spec registry, the zoo, the default parity session and
the reference runner's branch table all read from here. Everything is checked
when this package is imported, so an incomplete file fails at once with one
message naming the file and the missing piece.
"""

from __future__ import annotations

import importlib
import pkgutil

from fvkit.errors import SpecError
from fvkit.models.architectures.architecture import DEFAULT_REFERENCE_TRANSFORMERS, Architecture, ZooEntry
from fvkit.models.architectures.reference_branches import ALL_BRANCHES

#: Modules of this package that are not family files.
SUPPORT_MODULES = ("architecture", "layouts", "recipe_constants", "reference_branches", "weights_hash")


def _family_file(module_name: str) -> str:
    return f"fvkit/models/architectures/{module_name}.py"


def _discover() -> tuple:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in SUPPORT_MODULES or info.name.startswith("_"):
            continue
        where = _family_file(info.name)
        module = importlib.import_module(f"{__name__}.{info.name}")
        arch = getattr(module, "ARCHITECTURE", None)
        if not isinstance(arch, Architecture):
            raise SpecError(f"{where} defines no ARCHITECTURE = Architecture(...); every module in "
                            f"fvkit/models/architectures/ except {', '.join(SUPPORT_MODULES)} is a "
                            f"family file (move helpers elsewhere)")
        arch.validate(where)
        if arch.name != info.name:
            raise SpecError(f"{where} defines the architecture '{arch.name}'; name the file "
                            f"{arch.name}.py or the spec '{info.name}', so each is found by the other")
        found.append(arch)
    _check_unique(found)
    return tuple(sorted(found, key=lambda a: -a.lookup_priority))


def _check_unique(found: list) -> None:
    """No two families may share a priority, a zoo position, a zoo alias or a config class."""
    for what, key in (("lookup_priority", lambda a: [a.lookup_priority]),
                      ("zoo_order", lambda a: [a.zoo_order]),
                      ("zoo alias", lambda a: [e.alias for e in a.zoo]),
                      ("config architecture", lambda a: list(a.spec.architectures))):
        owner: dict = {}
        for arch in found:
            for value in key(arch):
                if value in owner:
                    raise SpecError(
                        f"{_family_file(arch.name)} and {_family_file(owner[value])} both use "
                        f"{what} {value!r}; give each family its own"
                    )
                owner[value] = arch.name


_ARCHITECTURES = _discover()


def all_architectures() -> tuple:
    """Every registered architecture, highest ``lookup_priority`` first."""
    return _ARCHITECTURES


def get_architecture(name: str) -> Architecture:
    for arch in _ARCHITECTURES:
        if arch.name == name:
            return arch
    raise SpecError(f"no architecture '{name}' in fvkit/models/architectures/; registered: "
                    f"{', '.join(sorted(a.name for a in _ARCHITECTURES))}")


def zoo_recipes() -> dict:
    """``{alias: ZooEntry}``: default parity models first, then the others, each by ``zoo_order``."""
    by_order = sorted(_ARCHITECTURES, key=lambda a: a.zoo_order)
    entries = [e for a in by_order for e in a.zoo if e.default_parity]
    entries += [e for a in by_order for e in a.zoo if not e.default_parity]
    return {entry.alias: entry for entry in entries}


def default_parity_models() -> tuple:
    """The zoo models every parity gate runs on by default: the tiny ones, then the real ones."""
    return tiny_parity_models() + real_parity_models()


def tiny_parity_models() -> tuple:
    """The default parity models with random weights (plumbing: one per architecture)."""
    return tuple(a for a, e in zoo_recipes().items() if e.default_parity and not e.trained)


def real_parity_models() -> tuple:
    """The default parity models that are trained checkpoints (the method's evidence)."""
    return tuple(a for a, e in zoo_recipes().items() if e.default_parity and e.trained)


def architecture_of(entry: ZooEntry) -> Architecture:
    return get_architecture(entry.spec)


def reference_branches() -> dict:
    """``{(blocks, attn, out_proj): {"name", "conv1d", "bias"}}`` for the reference runner.

    Only the reference's branches that some registered architecture uses, in
    the order of :data:`fvkit.models.architectures.reference_branches.ALL_BRANCHES`.
    """
    used = {a.reference_branch for a in _ARCHITECTURES if a.reference_branch is not None}
    return {branch.layout: branch.as_entry() for branch in ALL_BRANCHES if branch in used}


def reference_release(spec_name: str) -> str:
    """The transformers release a model's reference numbers come from, by its spec's name.

    A spec registered here names it in its family file (``reference_transformers``);
    any other spec (one written for a single run) gets the reference's own pin.
    """
    for arch in _ARCHITECTURES:
        if arch.name == spec_name:
            return arch.reference_transformers
    return DEFAULT_REFERENCE_TRANSFORMERS
