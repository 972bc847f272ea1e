"""Whether a process is still there (tests that check a kill really happened)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while a process (or an unreaped zombie) with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
