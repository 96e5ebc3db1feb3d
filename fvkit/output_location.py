"""Output locations are checked before any work, so a long computation is never lost
to a path that cannot be written.

    check_output_dir("results_fv/run", flag="--out")       # a directory to create or replace
    check_output_file("datasets/fixed_trials/x.json", flag="--out")

Each check ends with one :class:`OutputLocationError` naming the path and what to
do: a path that is an existing file (or directory, for a file), a path below a
file, a folder without write permission, a read-only file system.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from fvkit.errors import FvkitError


class OutputLocationError(FvkitError):
    """An output path that cannot be written."""


def _existing_ancestor(path: Path, flag: str) -> Path:
    """The nearest existing folder above ``path``; a file on the way is an error."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputLocationError(f"{flag} {path}: {parent} is a file, not a folder; pass a path "
                                          f"whose parent folders are folders")
            return parent
    return Path(path.absolute().anchor)


def _probe_writable(folder: Path, path: Path, flag: str) -> None:
    """Create and remove a small folder: the only test that catches read-only mounts and ACLs."""
    probe = folder / f".fvkit-write-check-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as err:
        why = "the file system is read-only" if err.errno == errno.EROFS else f"{err.strerror.lower()}"
        raise OutputLocationError(f"{flag} {path}: cannot write in {folder} ({why}); pass a writable location") from None


def check_output_dir(path, flag: str = "--out") -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputLocationError(f"{flag} {path} is an existing file; pass a directory path")
    parent = _existing_ancestor(path, flag)
    _probe_writable(parent, path, flag)
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        # No probe inside: a probe stranded there by a kill would look like a user's file.
        raise OutputLocationError(f"{flag} {path} is not writable, so an earlier run in it could not be "
                                  f"replaced; change its permissions or pass another {flag}")
    return path


def check_output_file(path, flag: str = "--out") -> Path:
    path = Path(path)
    if path.is_dir():
        raise OutputLocationError(f"{flag} {path} is a directory; pass a file path such as {path / 'trials.json'}")
    parent = _existing_ancestor(path, flag)
    _probe_writable(parent, path, flag)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputLocationError(f"{flag} {path} exists and is not writable; pass another file or change its permissions")
    return path
