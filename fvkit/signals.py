"""SIGINT and SIGTERM end a command cleanly: partial output is removed, earlier results stay.

    with stop_on_signals():
        ...long work and the final write...

    with signals_held():
        ...a few renames that must all happen (a signal is delivered after)...

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


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM that arrive in the block are delivered when it ends.

    Python runs signal handlers in the main thread only, so replacing the handlers
    there holds a signal back whichever thread the kernel hands it to (blocking it
    with a thread's signal mask would not: another thread, xdist's for one, would
    take it). Elsewhere, or where a handler was not set from Python, nothing is held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {}
    for sig in HANDLED:
        handler = signal.getsignal(sig)
        if handler is not None:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught:
            signal.raise_signal(signum)  # now to the handler the process had before
