"""A run directory that is always either the old complete run or the new complete one.

    check_replaceable(out_dir, RUN_FILES + ARTIFACT_FILES)   # before any computation
    publish(out_dir, {"run.json": b"...", ...})              # at the end

The new run is written into a staging folder beside ``out_dir`` and swapped in
whole. Where the kernel offers an atomic exchange of two paths (Linux
``renameat2(RENAME_EXCHANGE)``) the swap is one step; elsewhere the old run is
first renamed to a recognisable *aside* folder, the new one renamed in, and the
aside folder deleted. :func:`recover` undoes a swap cut short by SIGKILL or
power loss between those two renames, so the next run (or a reader) finds the
old complete run again. Nothing that fvkit did not write is ever deleted: a
directory holding other files is refused before any work starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterable, Mapping

from fvkit.errors import FvkitError
from fvkit.processes import pid_alive

#: The file whose presence marks a directory as a complete fvkit run; it is
#: written last into the staging folder, so a folder holding it is whole.
MARKER = "run.json"
#: Name parts of the hidden folders beside a run: ``.<name>.staging-*`` holds a run
#: being written, ``.<name>.aside-*`` the previous run during a swap.
STAGING_TAG = "staging"
ASIDE_TAG = "aside"
#: linux/fs.h: swap two paths atomically.
RENAME_EXCHANGE = 2
AT_FDCWD = -100


class OutputDirError(FvkitError):
    """An output directory that fvkit may not write or replace."""


def _hidden(out_dir: Path, tag: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _hidden_siblings(out_dir: Path, tag: str) -> list:
    prefix = f".{out_dir.name}.{tag}-"
    if not out_dir.parent.is_dir():
        return []
    return sorted(p for p in out_dir.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _pid_alive(name: str) -> bool:
    """Whether the process that made a hidden folder (pid in its name) still runs."""
    try:
        pid = int(name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False
    return pid_alive(pid)


def recover(out_dir) -> None:
    """Restore a previous run that an interrupted swap left aside; drop dead stagings.

    Only folders whose writer is gone are touched, so a run in progress in
    another process keeps its staging folder.
    """
    out_dir = Path(out_dir)
    for aside in _hidden_siblings(out_dir, ASIDE_TAG):
        if _pid_alive(aside.name):
            continue
        if not out_dir.exists() and (aside / MARKER).is_file():
            os.rename(aside, out_dir)
        else:
            shutil.rmtree(aside, ignore_errors=True)
    for staging in _hidden_siblings(out_dir, STAGING_TAG):
        if not _pid_alive(staging.name):
            shutil.rmtree(staging, ignore_errors=True)


def check_replaceable(out_dir, known_files: Iterable[str], flag: str = "--out") -> None:
    """Refuse, before any work, a directory that holds anything a run did not write."""
    out_dir = Path(out_dir)
    recover(out_dir)
    if not out_dir.is_dir():
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    known = set(known_files)
    foreign = [name for name in entries if name not in known or (out_dir / name).is_dir()]
    if not (out_dir / MARKER).is_file():
        raise OutputDirError(f"{flag} {out_dir} exists and is not an fvkit run directory "
                             f"(it holds {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); "
                             f"pass a new or empty {flag} directory")
    if foreign:
        raise OutputDirError(f"{flag} {out_dir} holds files that fvkit did not write "
                             f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}), which replacing "
                             f"the run would delete; move them out or pass another {flag}")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step; False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def step(name: str) -> None:
    """A named point of the final write; does nothing (the interrupt tests stop here)."""


def publish(out_dir, files: Mapping[str, bytes], marker: str = MARKER) -> Path:
    """Write ``files`` as the complete content of ``out_dir``, replacing a previous run whole.

    ``marker`` is written last. The staging folder is created with the user's
    umask (not the 0700 of ``tempfile.mkdtemp``). On any exception, including
    KeyboardInterrupt, the staging folder is removed and the old run stays.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden(out_dir, STAGING_TAG)
    os.mkdir(staging)
    aside = None
    try:
        step("staging")
        for name, data in files.items():
            if name != marker:
                _write_synced(staging / name, data)
                step(f"file:{name}")
        if marker in files:
            _write_synced(staging / marker, files[marker])
        step("staged")
        if out_dir.exists():
            if _exchange(staging, out_dir):
                # ``staging`` now holds the old run.
                step("swapped")
                shutil.rmtree(staging, ignore_errors=True)
                return out_dir
            aside = _hidden(out_dir, ASIDE_TAG)
            os.rename(out_dir, aside)
            step("old-aside")
        os.rename(staging, out_dir)
        step("new-in")
    except BaseException:
        if aside is not None and not out_dir.exists():
            os.rename(aside, out_dir)
            aside = None
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if aside is not None and out_dir.exists():
            shutil.rmtree(aside, ignore_errors=True)
    return out_dir


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
