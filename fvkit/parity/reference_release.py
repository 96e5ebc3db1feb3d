"""Which transformers release each model's reference numbers come from, and where to make them.

    release_of("tiny-llama")                  # '4.49.0' (the reference's own pin)
    tox_env("4.53.3")                         # 'reference-tf453'
    check_update_release("gemma3-270m", "4.53.3", installed="4.49.0")   # raises ReferenceReleaseError

A model's release is declared once, by its architecture
(``reference_transformers`` in its family file, default the reference's pin
4.49.0). Snapshots are written only under that release; a snapshot made under
another one is not the model's reference numbers, and a gate comparing against
it says so.
"""

from __future__ import annotations

import re
from typing import Optional

from fvkit.errors import FvkitError
from fvkit.models.architectures import reference_release
from fvkit.models.architectures.architecture import DEFAULT_REFERENCE_TRANSFORMERS, RELEASE_PATTERN

__all__ = ["DEFAULT_REFERENCE_TRANSFORMERS", "ReferenceReleaseError", "check_update_release", "installed_release",
           "release_mismatch", "release_of", "tox_env"]

#: Prefix of the tox environments that regenerate snapshots, one per release (tox.ini).
TOX_ENV_PREFIX = "reference-tf"


class ReferenceReleaseError(FvkitError):
    """Reference numbers would be made under another transformers release than the model's own."""


def installed_release() -> str:
    import transformers

    return transformers.__version__


def release_of(name: str, spec_name: Optional[str] = None) -> str:
    """The release of a model by its spec: ``spec_name`` when given (--model-spec, or read from
    the model's config), else a zoo alias's recipe spec; the reference's pin for anything else."""
    from fvkit.models.architectures import zoo_recipes

    entry = zoo_recipes().get(str(name))
    spec = spec_name or (entry.spec if entry is not None else None)
    return reference_release(spec) if spec else DEFAULT_REFERENCE_TRANSFORMERS


def tox_env(release: str) -> str:
    """The tox environment that regenerates snapshots under ``release`` (major and minor digits)."""
    major, minor = re.fullmatch(RELEASE_PATTERN, release).group(0).split(".")[:2]
    return f"{TOX_ENV_PREFIX}{major}{minor}"


def check_release_text(release: str, what: str) -> str:
    if not re.fullmatch(RELEASE_PATTERN, str(release)):
        raise ReferenceReleaseError(f"{what} {release!r} is not a transformers release; write it like "
                                    f"'{DEFAULT_REFERENCE_TRANSFORMERS}'")
    return str(release)


def release_mismatch(model: str, release: str, made_under: Optional[str]) -> Optional[str]:
    """Why reference numbers made under ``made_under`` are not ``model``'s (None when they are)."""
    if made_under is None or made_under == release:
        return None
    return (f"made under transformers {made_under}, but {model}'s reference numbers come from transformers "
            f"{release}; regenerate them with `tox -e {tox_env(release)}`")


def check_update_release(model: str, release: str, installed: Optional[str] = None) -> None:
    """Refuse to write ``model``'s snapshots under any release but its own (before any work)."""
    installed = installed or installed_release()
    if installed != release:
        raise ReferenceReleaseError(
            f"--snapshot-update: {model}'s reference numbers come from transformers {release}, this environment has "
            f"{installed}; regenerate its snapshots with `tox -e {tox_env(release)}` (or `tox -e reference` for "
            f"every model), or keep this run to the models of {installed} with --reference-release {installed}")
