"""SIGINT and SIGTERM end a command cleanly: partial output is removed, earlier results stay.

    with stop_on_signals():
        ...long work and the final write...

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM (what ``kill``, a
batch scheduler or a container stop sends) end the process on the spot, with no
``finally`` blocks run, which would strand a half-written staging folder. Here
both raise :class:`Stopped`, a KeyboardInterrupt, so every cleanup path runs.
SIGKILL cannot be caught; :func:`fvkit.run_dir.recover` handles what it leaves.
"""

from __future__ import annotations

import contextlib
import signal
import threading

#: The signals turned into :class:`Stopped`.
HANDLED = (signal.SIGINT, signal.SIGTERM)
#: Shell convention for a process ended by signal N.
SIGNAL_EXIT_BASE = 128


class Stopped(KeyboardInterrupt):
    """The command was asked to stop by a signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return SIGNAL_EXIT_BASE + self.signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Within the block SIGINT and SIGTERM raise :class:`Stopped`; handlers are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in HANDLED}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
