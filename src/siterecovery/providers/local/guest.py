"""Host-side handling of the lab guest workload: start, stop, talk to it.

The workload process itself is :mod:`siterecovery.providers.local.workload`;
this module is what the local provider (and tests) use from the outside: the
control-socket client (the "guest tools" channel used to quiesce for
app-consistent points), spawning a workload detached, stopping it, and
reading the state file it keeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from siterecovery import processes
from siterecovery.domain.errors import GuestError
from siterecovery.providers.local.journal import DEFAULT_JOURNAL_SIZE

DEFAULT_RATE = 20.0
"""Records per second."""
DEFAULT_QUIESCE_TIMEOUT = 60.0
"""Seconds after which a quiesce thaws by itself."""
START_TIMEOUT = 15.0
"""Seconds :func:`spawn` waits for the control socket to answer."""
STOP_TIMEOUT = 10.0
"""Seconds a stopping workload has to finish its record."""
CONTROL_TIMEOUT = 60.0
"""Seconds a control call waits for its reply (generous: a loaded host)."""
IDEMPOTENT_ATTEMPTS = 3
"""How many times an idempotent call (status, thaw) is tried before its timeout counts."""
_IDEMPOTENT = frozenset({"status", "thaw"})

_MAX_LINE = 64 * 1024
_POLL = 0.02


class WorkloadControl:
    """Client of a workload's control socket.

    Each call opens its own connection, so one instance may be shared between
    threads. Every method raises :class:`GuestError` when the workload does not
    answer within ``timeout`` seconds (plus the quiesce timeout) or refuses;
    ``status`` and ``thaw``, idempotent, are tried :data:`IDEMPOTENT_ATTEMPTS`
    times first.
    """

    def __init__(self, path: Path | str, *, timeout: float = CONTROL_TIMEOUT) -> None:
        self._path = Path(path)
        self._timeout = timeout

    @property
    def path(self) -> Path:
        return self._path

    def quiesce(self, timeout: float = DEFAULT_QUIESCE_TIMEOUT) -> int:
        """Pause the guest's writes; return the last acknowledged seq.

        The disks do not change until :meth:`thaw` or ``timeout`` seconds.
        """
        reply = self._call({"op": "quiesce", "timeout": timeout}, self._timeout + timeout)
        return int(reply["seq"])

    def thaw(self) -> None:
        """End the most recent quiesce. Idempotent (a thaw too many is a no-op)."""
        self._call({"op": "thaw"}, self._timeout)

    def status(self) -> dict[str, Any]:
        """``seq``, ``paused``, ``depth``, ``rate``, ``records``, ``bytes``, ``seed``, ``pid``."""
        reply = self._call({"op": "status"}, self._timeout)
        reply.pop("ok", None)
        return reply

    def _call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        attempts = IDEMPOTENT_ATTEMPTS if request["op"] in _IDEMPOTENT else 1
        for attempt in range(1, attempts + 1):
            try:
                return self._call_once(request, timeout)
            except TimeoutError as e:
                if attempt == attempts:
                    raise GuestError(
                        detail=f"the guest workload at {self._path} did not answer "
                        f"'{request['op']}' within {timeout:g} s ({attempts} attempt"
                        f"{'s' if attempts > 1 else ''}): it is stopped, hung or starved of CPU"
                    ) from e
        raise AssertionError("unreachable")

    def _call_once(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            line = self._exchange(json.dumps(request).encode() + b"\n", timeout)
            reply = json.loads(line)
        except TimeoutError:
            raise
        except (OSError, ValueError) as e:
            raise GuestError(
                detail=f"the guest workload at {self._path} does not answer: {e}"
            ) from e
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else reply
            raise GuestError(detail=f"the guest workload refused {request['op']}: {error}")
        return reply

    def _exchange(self, request: bytes, timeout: float) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self._path))
            sock.sendall(request)
            with sock.makefile("rb") as reader:
                line = reader.readline(_MAX_LINE)
        if not line.endswith(b"\n"):
            raise ValueError("connection closed before a full reply")
        return line


def read_state(path: Path) -> dict[str, Any]:
    """The last state a workload saved to ``path``; GuestError when unreadable."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise GuestError(detail=f"cannot read the workload state {path}: {e}") from e
    if not isinstance(state, dict):
        raise GuestError(detail=f"the workload state {path} is not a JSON object")
    return state


_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(
    *,
    nbd_socket: Path,
    exports: Sequence[str],
    control: Path,
    state: Path,
    log: Path,
    rate: float = DEFAULT_RATE,
    seed: int | None = None,
    format_if_blank: bool = False,
    journal_size: int = DEFAULT_JOURNAL_SIZE,
    timeout: float = START_TIMEOUT,
    follow: Path | None = None,
) -> int:
    """Start a workload in a session of its own and wait until it answers.

    Its stdout and stderr go to ``log`` (appended). Returns its pid. Raises
    GuestError (with the log's tail) when it exits or stays silent for
    ``timeout`` seconds; it is then killed.
    """
    argv = [
        sys.executable, "-m", "siterecovery.providers.local.workload",
        "--nbd-socket", str(nbd_socket), "--exports", ",".join(exports),
        "--control", str(control), "--state", str(state), "--rate", repr(rate),
        "--journal-size", str(journal_size),
    ]  # fmt: skip
    argv += ["--seed", str(seed)] if seed is not None else []
    argv += ["--format"] if format_if_blank else []
    argv += ["--follow", str(follow)] if follow is not None else []
    with open(log, "ab") as out:
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, env=_child_env(),
            )  # fmt: skip
        except OSError as e:
            raise GuestError(detail=f"cannot start the guest workload: {e}") from e
    for child in _children.values():
        child.poll()  # Reap the workloads that exited (their status stays in the object).
    _children[process.pid] = process
    _wait_ready(process, Path(control), Path(log), timeout)
    return process.pid


def _child_env() -> dict[str, str]:
    """Our environment, with this package importable even when not installed."""
    root = str(Path(__file__).resolve().parents[3])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def _wait_ready(process: subprocess.Popen[bytes], control: Path, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    client = WorkloadControl(control, timeout=1.0)
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(GuestError):
            if client.status().get("pid") == process.pid:
                return
        time.sleep(_POLL)
    code = process.poll()
    if code is None:
        process.kill()
        process.wait()
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise GuestError(detail=f"the guest workload did not start (exit {code}): {tail}")


def stop(pid: int, *, timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM a workload and wait for it to exit (SIGKILL after ``timeout`` s).

    Returns its exit status when :func:`spawn` started it in this process, else
    None. Idempotent: a workload already gone is not an error.
    """
    process = _children.pop(pid, None)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if process is None:
        _wait_gone(pid, timeout)
        return None
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def wait(pid: int, *, timeout: float = STOP_TIMEOUT) -> int | None:
    """Wait up to ``timeout`` seconds for a workload to exit by itself.

    Returns its exit status when :func:`spawn` started it in this process (None
    for another's, or when it is still running at the deadline).
    """
    process = _children.get(pid)
    if process is None:
        _wait_gone(pid, timeout, kill=False)
        return None
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        return None
    _children.pop(pid, None)
    return code


def _wait_gone(pid: int, timeout: float, *, kill: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while processes.alive(pid):
        if time.monotonic() > deadline:
            if kill:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
        time.sleep(_POLL)
