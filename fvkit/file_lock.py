"""An exclusive lock on a file, for work that only one process may do at a time.

    with exclusive_lock("/cache/.model.lock"):
        build_once()          # an xdist worker that needs the same file waits here

Used by the zoo's checkpoint builds and the joining of chunked GGUF files: a second
process waits for the first, then finds the finished result.
"""

from __future__ import annotations

import contextlib
import fcntl
from typing import Iterator


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
