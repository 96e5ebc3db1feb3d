"""Importing the reference (function_vectors ``src/``) and baukit from the paths given.

Nothing of either is part of this repository. The reference's modules are imported
under their own names (``utils.*``, ``compute_indirect_effect``), as its scripts do,
and then taken out of ``sys.modules`` again, so that a project module called
``utils`` is neither shadowed nor shadows them; the function objects keep their
module globals and stay usable.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fvkit.errors import FvkitError

from .isolation import reference_warnings_hidden

#: File whose presence identifies a reference checkout.
REFERENCE_MARKER = Path("src") / "utils" / "extract_utils.py"
#: Top-level module names the reference and baukit occupy while being imported.
REFERENCE_TOP_MODULES = ("utils", "compute_indirect_effect", "baukit")
#: The reference modules the runner calls, by the names its scripts import them under.
REFERENCE_MODULE_NAMES = ("utils.prompt_utils", "utils.model_utils", "utils.intervention_utils",
                          "utils.eval_utils", "utils.extract_utils", "compute_indirect_effect")


@dataclass
class ReferenceModules:
    """The reference's modules, imported from one checkout (cached per path pair)."""

    src: Path
    baukit_dir: Path
    prompt_utils: types.ModuleType
    model_utils: types.ModuleType
    intervention_utils: types.ModuleType
    eval_utils: types.ModuleType
    extract_utils: types.ModuleType
    compute_indirect_effect: types.ModuleType
    baukit: types.ModuleType
    normalizations: list = field(default_factory=list)

    def namespaces(self) -> dict:
        return {
            "utils.prompt_utils": self.prompt_utils, "utils.model_utils": self.model_utils,
            "utils.intervention_utils": self.intervention_utils, "utils.eval_utils": self.eval_utils,
            "utils.extract_utils": self.extract_utils, "compute_indirect_effect": self.compute_indirect_effect,
        }


_MODULE_CACHE: dict = {}


def reference_src_dir(reference_src) -> Path:
    """The checkout's ``src`` folder; accepts the checkout or its ``src`` folder."""
    root = Path(reference_src).expanduser()
    if (root / REFERENCE_MARKER).is_file():
        return (root / "src").resolve()
    if (root / "utils" / "extract_utils.py").is_file():
        return root.resolve()
    raise FvkitError(
        f"reference checkout '{reference_src}' is not usable: expected a function_vectors "
        f"checkout containing {REFERENCE_MARKER} (github.com/ericwtodd/function_vectors); "
        f"pass --reference-src PATH or set FVKIT_REFERENCE_SRC"
    )


def baukit_package_dir(baukit=None) -> Path:
    """The ``baukit`` package folder: from a checkout path, the package path, or the installed one."""
    if baukit is not None:
        root = Path(baukit).expanduser()
        for cand in (root / "baukit", root):
            if (cand / "nethook.py").is_file():
                return cand.resolve()
        raise FvkitError(
            f"baukit not found at '{baukit}': expected a davidbau/baukit checkout containing "
            f"baukit/nethook.py; pass --baukit PATH (or set FVKIT_BAUKIT) or pip install baukit"
        )
    spec = importlib.util.find_spec("baukit")
    if spec is None or not spec.submodule_search_locations:
        raise FvkitError(
            "baukit is not installed and no path was given; pass --baukit PATH to a davidbau/baukit "
            "checkout (or set FVKIT_BAUKIT) or pip install baukit"
        )
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _drop_modules(tops) -> dict:
    """Remove modules under the given top-level names from sys.modules; returns them."""
    gone = {}
    for name in list(sys.modules):
        if name.split(".")[0] in tops:
            gone[name] = sys.modules.pop(name)
    return gone


def _nethook_alone(pkg_dir: Path, err: ImportError, notes: list) -> types.ModuleType:
    """baukit's package __init__ pulls in widget and image modules (torchvision,
    IPython); the reference uses only nethook's TraceDict and get_module."""
    _drop_modules(("baukit",))
    shim = types.ModuleType("baukit")
    shim.__path__ = [str(pkg_dir)]
    shim.__file__ = str(pkg_dir / "__init__.py")
    sys.modules["baukit"] = shim
    nethook = importlib.import_module("baukit.nethook")
    for name in dir(nethook):
        if not name.startswith("_"):
            setattr(shim, name, getattr(nethook, name))
    notes.append(
        f"baukit's package __init__ does not import here ({type(err).__name__}: {err}); "
        f"baukit/nethook.py was loaded alone as the 'baukit' package (the reference uses only "
        f"TraceDict and get_module, both defined there)"
    )
    return shim


def _import_baukit(pkg_dir: Path, notes: list) -> types.ModuleType:
    parent = str(pkg_dir.parent)
    sys.path.insert(0, parent)
    try:
        try:
            module = importlib.import_module("baukit")
        except ImportError as err:
            module = _nethook_alone(pkg_dir, err, notes)
    finally:
        sys.path.remove(parent)
    origin = Path(getattr(module, "__file__", "") or "").resolve().parent
    if origin != pkg_dir:
        raise FvkitError(f"'import baukit' resolved to {origin}, not the requested {pkg_dir}; "
                         f"remove the other baukit from sys.path or pass --baukit to it")
    return module


class StubbedAttributeError(FvkitError, AttributeError):
    """An attribute of a stand-in module was used for real."""


def _bitsandbytes_stub(notes: list) -> Optional[types.ModuleType]:
    """A stand-in for bitsandbytes when it cannot be imported (the reference imports it
    at module top but uses it only to dequantize 4-bit LLaMA-2-70B weights)."""
    try:
        importlib.import_module("bitsandbytes")
        return None
    except Exception as err:  # a broken install raises more than ImportError
        reason = f"{type(err).__name__}: {err}"

    def _unavailable(name):
        # An AttributeError too, so hasattr() probes (inspect, transformers) see a bare module.
        if name.startswith("__"):
            raise AttributeError(name)
        raise StubbedAttributeError(f"the reference used bitsandbytes.{name}, which is only stubbed here "
                                    f"({reason}); 4-bit quantized models are not supported by the reference runner")

    stub = types.ModuleType("bitsandbytes")
    stub.__getattr__ = _unavailable
    notes.append(f"bitsandbytes is not importable ({reason}); a stub module stands in for the reference's "
                 f"top-level 'import bitsandbytes' (used only for 4-bit LLaMA-2-70B, never on this path)")
    return stub


def _import_reference_modules(src: Path, notes: list) -> dict:
    """The reference's stage modules imported from ``src`` (with a bitsandbytes stub
    in place while they import, when the real one is missing)."""
    try:
        # transformers probes for bitsandbytes with find_spec when it is first imported,
        # and that probe raises on a stub without __spec__: import it before the stub goes in.
        importlib.import_module("transformers")
    except ImportError as err:
        raise FvkitError(f"importing the reference from {src} failed ({type(err).__name__}: {err}); "
                         f"install transformers in this environment") from None
    had_bnb = "bitsandbytes" in sys.modules
    stub = _bitsandbytes_stub(notes)
    if stub is not None:
        sys.modules["bitsandbytes"] = stub
    sys.path.insert(0, str(src))
    try:
        with reference_warnings_hidden():
            mods = {name: importlib.import_module(name) for name in REFERENCE_MODULE_NAMES}
    except ImportError as err:
        raise FvkitError(f"importing the reference from {src} failed ({type(err).__name__}: {err}); "
                         f"install its dependencies (pandas, scikit-learn, tqdm) in this environment") from None
    finally:
        sys.path.remove(str(src))
        if stub is not None and not had_bnb:
            sys.modules.pop("bitsandbytes", None)
    for name, mod in mods.items():
        if not Path(mod.__file__).resolve().is_relative_to(src):
            raise FvkitError(f"reference module '{name}' resolved to {mod.__file__}, outside {src}; "
                             f"another '{name.split('.')[0]}' shadows the reference")
    return mods


def load_reference(reference_src, baukit=None) -> ReferenceModules:
    """Import the reference's modules from ``reference_src`` with baukit from ``baukit``
    (see the module docstring for why they leave ``sys.modules`` again)."""
    src = reference_src_dir(reference_src)
    pkg_dir = baukit_package_dir(baukit)
    key = (src, pkg_dir)
    if key in _MODULE_CACHE:
        return _MODULE_CACHE[key]
    notes: list = []
    saved = _drop_modules(REFERENCE_TOP_MODULES)
    try:
        with reference_warnings_hidden():
            bk = _import_baukit(pkg_dir, notes)
        mods = _import_reference_modules(src, notes)
    finally:
        _drop_modules(REFERENCE_TOP_MODULES)
        sys.modules.update(saved)
    refs = ReferenceModules(
        src=src, baukit_dir=pkg_dir, prompt_utils=mods["utils.prompt_utils"], model_utils=mods["utils.model_utils"],
        intervention_utils=mods["utils.intervention_utils"], eval_utils=mods["utils.eval_utils"],
        extract_utils=mods["utils.extract_utils"], compute_indirect_effect=mods["compute_indirect_effect"],
        baukit=bk, normalizations=notes,
    )
    _MODULE_CACHE[key] = refs
    return refs
