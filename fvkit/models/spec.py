"""ModelSpec: everything fvkit needs to know about one decoder architecture.

    spec = get_spec("llama")
    blocks = resolve_blocks(model, spec)          # fvkit.models.adapters

A spec is data, not code: dotted module paths, the BOS policy and optional
static dimensions. The pipeline never branches on a model's name; it asks the
spec (through :mod:`fvkit.models.adapters`) where the blocks, attention modules and
out-projections are.

The built-in specs come from the family files in :mod:`fvkit.models.architectures`
(one file per architecture, which also holds its zoo models and reference
branch); :func:`register` adds others at run time.

Outside parity mode (a GPU, half precision, a model spread by accelerate) the
modules a spec names are used where they were placed: fvkit asks each one for
its device and dtype (:mod:`fvkit.models.placement`) and puts what it creates
for that module there, never assuming one device for the whole model.

``prepend_bos`` keeps the reference's meaning: True says *the tokenizer adds a
BOS token by itself*, so no BOS text is written into the prompt; False says it
does not, so ``bos_text`` is written at the start of every prompt.
"""

from __future__ import annotations

from typing import Iterable, Optional

from fvkit.errors import SpecError
from fvkit.models.architectures import all_architectures
# ModelSpec lives with the other parts of an architecture; it is re-exported here,
# where callers have always found it.
from fvkit.models.architectures.architecture import ALTERNATIVE_FIELDS, PATH_FIELDS, ModelSpec

__all__ = ["ALTERNATIVE_FIELDS", "PATH_FIELDS", "ModelSpec", "register", "all_specs", "spec_names",
           "get_spec", "spec_for_model_id", "spec_for_architectures", "find_spec"]

#: Lookup priority of a spec registered without one: below every built-in architecture,
#: so a spec added at run time never takes a model id away from a built-in one.
DEFAULT_PRIORITY = 0

_REGISTRY: dict = {}
#: name -> lookup priority. When several specs match one model id or config
#: architecture, the highest priority wins (equal priorities: the earlier registered).
_PRIORITY: dict = {}


def register(spec: ModelSpec, *, replace: bool = False, priority: Optional[int] = None) -> ModelSpec:
    """Validate and register a spec; a malformed spec fails here, naming the field.

    ``priority`` decides lookup ties (see :func:`find_spec`); without it a new
    spec gets :data:`DEFAULT_PRIORITY` and a replaced one keeps its own.
    """
    spec.validate()
    if spec.name in _REGISTRY and not replace:
        raise SpecError(f"a ModelSpec named '{spec.name}' is already registered; pick another name")
    _REGISTRY[spec.name] = spec
    if priority is not None or spec.name not in _PRIORITY:
        _PRIORITY[spec.name] = DEFAULT_PRIORITY if priority is None else priority
    return spec


def _by_priority() -> list:
    # sorted() is stable: equal priorities keep their registration order.
    return sorted(_REGISTRY.values(), key=lambda s: -_PRIORITY.get(s.name, DEFAULT_PRIORITY))


def all_specs() -> list:
    """Every registered spec, in lookup order (highest priority first)."""
    return _by_priority()


def spec_names() -> list:
    return [spec.name for spec in _by_priority()]


def get_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(
            f"unknown model spec '{name}'; registered specs: {', '.join(sorted(_REGISTRY))} "
            f"(see `fvkit specs`)"
        ) from None


def spec_for_model_id(model_id: str) -> Optional[ModelSpec]:
    """The highest-priority spec whose model-id patterns match ``model_id``."""
    for spec in _by_priority():
        if spec.matches_model_id(model_id):
            return spec
    return None


def spec_for_architectures(architectures: Optional[Iterable[str]]) -> Optional[ModelSpec]:
    for arch in architectures or ():
        for spec in _by_priority():
            if arch in spec.architectures:
                return spec
    return None


def find_spec(model_id: str = "", architectures: Optional[Iterable[str]] = None) -> ModelSpec:
    """Pick a spec by model id first (a LLaMA-architecture model with its own tokenizer
    policy, such as SmolLM2, is told apart by id), then by ``config.architectures``."""
    spec = spec_for_model_id(model_id) if model_id else None
    spec = spec or spec_for_architectures(architectures)
    if spec is None:
        raise SpecError(
            f"no registered ModelSpec serves model '{model_id}' (architectures "
            f"{list(architectures or [])}); pass --model-spec with one of: "
            f"{', '.join(sorted(_REGISTRY))}, or register a new spec"
        )
    return spec


# --- Built-in architectures ------------------------------------------------------------
# One file each in fvkit/models/architectures/; their lookup_priority settles ties
# (a checkpoint family such as smollm2 above the generic architecture it shares).

for _architecture in all_architectures():
    register(_architecture.spec, priority=_architecture.lookup_priority)
del _architecture
