"""Whether a process still runs: the test that decides if a hidden folder is abandoned.

Run staging folders and parity report sessions carry their writer's pid in
their names; both are cleaned up only when that writer is gone.
"""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` exists on this host (ours always does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # It exists, under another user.
        return True
    return True
