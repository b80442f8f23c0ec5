"""Processes found by their pid: whether one still runs, and stopping one.

Daemons this package starts (qemu-storage-daemons, guest workloads, lab
agents, private libvirtds) are found again by the pid they wrote, possibly by
another process than the one that started them. A pid is alive when
``/proc/PID/stat`` shows it in any state but zombie (``Z``) or dead (``X``);
when it is a child of this process, its exit is also reaped here, so a
zombie of ours never counts as alive. Whether the pid is still the program
one expects (pids are reused) is for the caller to check, from its command
line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

POLL = 0.05
"""Seconds between two looks at a process that is being stopped."""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (reaping it first when it is an ended child of ours)."""
    with contextlib.suppress(ChildProcessError, OSError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return state(pid) not in (None, "Z", "X")


def state(pid: int) -> str | None:
    """The one-letter state ``/proc/PID/stat`` gives (``R``, ``S``, ``Z``…), None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


KILL_WAIT = 5.0
"""Seconds a SIGKILLed process is waited for (one in uninterruptible sleep ends later)."""


def terminate(pid: int, *, timeout: float) -> bool:
    """SIGTERM ``pid``, wait up to ``timeout`` seconds for it to end, then SIGKILL
    it (and wait up to :data:`KILL_WAIT`); whether it ended by itself (False:
    it was killed). Idempotent: a pid already gone is done."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, timeout):
        return True
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, KILL_WAIT)
    return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True
