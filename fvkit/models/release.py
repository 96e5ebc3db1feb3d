"""Can the installed transformers release build a model of this architecture?

    check_release("gemma3", "gemma3-270m")     # UnsupportedReleaseError under transformers 4.49

An architecture newer than a transformers release (Gemma 3 arrived in 4.50)
cannot be loaded there at all: transformers fails deep inside its config or
GGUF code with a message about an unknown model type. The family file states
its oldest release (``Architecture.min_transformers``), and this check runs
before anything is assembled, converted or loaded, so the user reads one
sentence naming the model, the installed release and the fix. The parity
suite skips such a model's gates with that sentence; a model that fails to
load for any other reason (a missing package, a damaged file) still fails them.
"""

from __future__ import annotations

from fvkit.errors import UnsupportedReleaseError


def installed_transformers() -> str:
    import transformers

    return transformers.__version__


def release_supports(min_release: str, installed: str) -> bool:
    """Whether ``installed`` is ``min_release`` or newer (pre-releases of it count as older)."""
    from packaging.version import Version

    return not min_release or Version(installed) >= Version(min_release)


def check_release(spec_name: str, model: str, installed: str = "") -> None:
    """Refuse ``model`` (served by spec ``spec_name``) if the installed transformers is too old
    for its architecture; specs registered at run time have no architecture and pass."""
    from fvkit.models.architectures import all_architectures

    arch = next((a for a in all_architectures() if a.name == spec_name), None)
    if arch is None or not arch.min_transformers:
        return
    installed = installed or installed_transformers()
    if not release_supports(arch.min_transformers, installed):
        raise UnsupportedReleaseError(
            f"model '{model}' (spec '{spec_name}') needs transformers >= {arch.min_transformers}, "
            f"but this environment has transformers {installed}, which cannot build this architecture; "
            f"install a newer release (`pip install 'transformers>={arch.min_transformers}'`) or use "
            f"an environment that has one"
        )
