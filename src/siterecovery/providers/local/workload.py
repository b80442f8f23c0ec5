"""The lab guest workload: the "guest OS + application" of a local-provider VM.

It writes journal records (see :mod:`siterecovery.providers.local.journal`) to
the VM's disks over NBD at a steady rate, acknowledging each after a flush, and
answers a control socket through which replication quiesces it for
app-consistent points. Run it as::

    python -m siterecovery.providers.local.workload --nbd-socket PATH \\
        --exports d0,d1 --control PATH --state PATH \\
        [--rate WRITES_PER_S] [--seed N] [--format] [--journal-size BYTES] \\
        [--follow OTHER_STATE]

or, inside a real guest (disks as block devices or raw files, no libnbd)::

    python -m siterecovery.providers.local.workload --device /dev/vda \\
        [--device /dev/vdb ...] --control PATH --state PATH [...]

``--follow`` names the state file of another VM's workload this one depends
on (an application tier): before each record the workload reads that file and
links the record to the other's last acknowledged seq (see the journal's links).

``--format`` formats the disks unless they already hold a journal; a restarted
workload continues the journal after the last record on disk, with the seed of
the superblock. ``--rate 0`` idles.

Control socket (unix, one JSON object per line each way; every reply has ``ok``
and, when false, ``error``):

- ``{"op": "quiesce", "timeout": S}`` finishes the record in flight (already
  flushed) and pauses: ``{"ok": true, "seq": N}`` with N the last acknowledged
  seq; the disks do not change until the matching thaw. Quiesces nest (a
  counter); each one thaws by itself ``S`` seconds (default 60) after it was
  taken, so a crashed replicator never freezes the guest for good.
- ``{"op": "thaw"}`` ends the most recent quiesce (a no-op when none):
  ``{"ok": true, "depth": D}``.
- ``{"op": "status"}``: ``seq``, ``paused``, ``depth``, ``rate``, ``records``,
  ``bytes``, ``seed``, ``pid``.

State file (``--state``): the status as JSON, replaced atomically (temporary
file + rename) at most 4 times a second while it changes, and on exit (then
with ``"running": false``); ``seq`` there never exceeds what is on disk.

SIGTERM or SIGINT: the record in flight completes, the state is saved, exit 0.
When the NBD server (or a ``--device``) fails: a message on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.file import FileDevice
from siterecovery.domain.errors import GuestError, SiteRecoveryError
from siterecovery.providers.local.guest import (
    DEFAULT_QUIESCE_TIMEOUT,
    DEFAULT_RATE,
    STOP_TIMEOUT,
    WorkloadControl,
)
from siterecovery.providers.local.journal import (
    DEFAULT_JOURNAL_SIZE,
    JournalWriter,
    format_disks,
    read_superblock,
)

STATE_INTERVAL = 0.25
"""Seconds between two saves of the state file."""

_PROBE_INTERVAL = 1.0
_MAX_SOCKET_PATH = 107
_MAX_LINE = 64 * 1024
_POLL = 0.02


class Workload:
    """The writer loop and the quiesce state of one running workload.

    :meth:`run` is the body of the single writer thread (the only user of the
    devices); :meth:`quiesce`, :meth:`thaw`, :meth:`status` and :meth:`stop`
    are thread-safe and called from control and main threads.
    """

    def __init__(self, writer: JournalWriter, *, rate: float, follow: Path | None = None) -> None:
        self._writer = writer
        self._rate = rate
        self._follow = follow
        self._cond = threading.Condition()
        self._holds: list[float] = []  # Auto-thaw deadlines (monotonic), oldest first.
        self._busy = False
        self._stopping = False
        self._error: str | None = None
        self._seq = writer.last_seq
        self._records = 0
        self._bytes = 0
        self._due = time.monotonic()

    @property
    def error(self) -> str | None:
        """Why the writer stopped on its own (None while it runs or after stop())."""
        return self._error

    def run(self) -> None:
        """Write records until :meth:`stop` or a device error (kept in :attr:`error`)."""
        try:
            while action := self._next_action():
                action()
        except SiteRecoveryError as e:
            self._fail(str(e))
        except Exception as e:  # A bug: still stop cleanly and say why.
            self._fail(f"internal error: {e!r}")
            raise
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _fail(self, error: str) -> None:
        with self._cond:
            self._error, self._stopping = error, True

    def _next_action(self) -> Callable[[], None] | None:
        """Wait for a record to be due (or a probe while idle); None when stopping.

        The returned action runs outside the lock with ``_busy`` set.
        """
        with self._cond:
            idle_since = time.monotonic()
            while not self._stopping:
                now = time.monotonic()
                self._expire(now)
                wait = self._wait_time(now)
                if wait <= 0 or now - idle_since >= _PROBE_INTERVAL:
                    self._busy = True
                    return self._write_one if wait <= 0 else self._probe
                self._cond.wait(min(wait, _PROBE_INTERVAL))
            return None

    def _wait_time(self, now: float) -> float:
        if self._holds:
            return min(self._holds) - now
        return self._due - now if self._rate > 0 else _PROBE_INTERVAL

    def _write_one(self) -> None:
        record = self._writer.append(followed_link(self._follow))
        with self._cond:
            now = time.monotonic()
            interval = 1.0 / self._rate if self._rate > 0 else 0.0
            self._due = max(self._due + interval, now - interval)
            self._seq = record.seq
            self._records += 1
            self._bytes += record.length
            self._busy = False
            self._cond.notify_all()

    def _probe(self) -> None:
        """Read the superblock sector: an idle guest still notices a dead server."""
        self._writer.probe()
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def _expire(self, now: float) -> None:
        """Drop the quiesces whose timeout passed (auto-thaw)."""
        if any(deadline <= now for deadline in self._holds):
            self._holds = [deadline for deadline in self._holds if deadline > now]
            self._due = max(self._due, now)
            self._cond.notify_all()

    def quiesce(self, timeout: float = DEFAULT_QUIESCE_TIMEOUT) -> int:
        """Pause after the record in flight; return the last acknowledged seq.

        The pause holds until the matching :meth:`thaw` or ``timeout`` seconds.
        Raises GuestError when the workload is stopping or the record in flight
        does not complete within ``timeout``.
        """
        with self._cond:
            if self._stopping:
                raise GuestError(
                    detail=f"the guest workload is stopping: {self._error or 'asked to'}"
                )
            hold = time.monotonic() + timeout
            self._holds.append(hold)
            self._cond.notify_all()
            if self._cond.wait_for(lambda: not self._busy, timeout) and not self._stopping:
                return self._seq
            with contextlib.suppress(ValueError):
                self._holds.remove(hold)
            raise GuestError(detail=f"the guest workload did not quiesce: {self._error or 'busy'}")

    def thaw(self) -> int:
        """End the most recent quiesce (none: no-op); return how many still hold."""
        with self._cond:
            self._expire(time.monotonic())
            if self._holds:
                self._holds.pop()
                self._due = max(self._due, time.monotonic())
                self._cond.notify_all()
            return len(self._holds)

    def status(self) -> dict[str, Any]:
        """Counters since start, the last acknowledged seq and the quiesce depth."""
        with self._cond:
            self._expire(time.monotonic())
            return {
                "seq": self._seq,
                "paused": bool(self._holds),
                "depth": len(self._holds),
                "rate": self._rate,
                "records": self._records,
                "bytes": self._bytes,
                "seed": self._writer.superblock.seed,
                "pid": os.getpid(),
            }

    def stop(self) -> None:
        """Ask the writer to stop after the record in flight. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()


def followed_link(state: Path | None) -> tuple[int, int]:
    """``(seed, acknowledged seq)`` of the followed workload, from its state file;
    ``(0, 0)`` (no link) when there is none or it cannot be read yet."""
    if state is None:
        return (0, 0)
    try:
        data = json.loads(state.read_text())
        return (int(data["seed"]), int(data["seq"]))
    except (OSError, ValueError, KeyError, TypeError):
        return (0, 0)


# Control socket -------------------------------------------------------------


def _op_quiesce(workload: Workload, request: dict[str, Any]) -> dict[str, Any]:
    timeout = float(request.get("timeout", DEFAULT_QUIESCE_TIMEOUT))
    if not 0 < timeout <= 24 * 3600:
        raise GuestError(detail=f"quiesce timeout {timeout} is not in (0, 86400] seconds")
    return {"seq": workload.quiesce(timeout)}


def _op_thaw(workload: Workload, request: dict[str, Any]) -> dict[str, Any]:
    return {"depth": workload.thaw()}


def _op_status(workload: Workload, request: dict[str, Any]) -> dict[str, Any]:
    return workload.status()


_OPS: dict[str, Callable[[Workload, dict[str, Any]], dict[str, Any]]] = {
    "quiesce": _op_quiesce,
    "thaw": _op_thaw,
    "status": _op_status,
}


def answer(workload: Workload, line: bytes) -> dict[str, Any]:
    """The reply to one request line (never raises)."""
    try:
        request = json.loads(line)
        op = _OPS.get(request["op"]) if isinstance(request, dict) else None
        if op is None:
            raise GuestError(detail=f"unknown request {line[:200]!r}; ops: {sorted(_OPS)}")
        return {"ok": True, **op(workload, request)}
    except (ValueError, KeyError, TypeError) as e:
        return {"ok": False, "error": f"bad request {line[:200]!r}: {e}"}
    except SiteRecoveryError as e:
        return {"ok": False, "error": str(e), "code": e.code}


class _ControlServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: Path, workload: Workload) -> None:
        self.workload = workload
        super().__init__(str(path), _ControlHandler)


class _ControlHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        workload = cast(_ControlServer, self.server).workload
        while line := self.rfile.readline(_MAX_LINE):
            reply = answer(workload, line)
            self.wfile.write(json.dumps(reply).encode() + b"\n")


def _bind_control(path: Path, workload: Workload) -> _ControlServer:
    """Listen on ``path``, replacing a stale socket; refuse when one answers."""
    if len(str(path).encode()) > _MAX_SOCKET_PATH:
        raise GuestError(detail=f"control socket path {path} is too long for a unix socket")
    if path.exists():
        if _answers(path):
            raise GuestError(detail=f"another guest workload answers at {path}")
        path.unlink()
    try:
        return _ControlServer(path, workload)
    except OSError as e:
        raise GuestError(detail=f"cannot listen on {path}: {e.strerror or e}") from e


def _answers(path: Path) -> bool:
    try:
        WorkloadControl(path, timeout=2.0).status()
    except GuestError:
        return False
    return True


# The process ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """The command line of the workload process: the disks are either NBD
    ``exports`` at ``nbd_socket`` or ``devices`` (files or block devices)."""

    nbd_socket: Path | None
    exports: tuple[str, ...]
    control: Path
    state: Path
    rate: float = DEFAULT_RATE
    seed: int | None = None
    format: bool = False
    journal_size: int = DEFAULT_JOURNAL_SIZE
    follow: Path | None = None
    devices: tuple[Path, ...] = ()


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Options from the command line (argparse exits 2 on a usage error)."""
    parser = argparse.ArgumentParser(prog="python -m siterecovery.providers.local.workload")
    parser.add_argument("--nbd-socket", type=Path, default=None)
    parser.add_argument("--exports", default="", help="export names, disk 0 first: d0,d1")
    parser.add_argument(
        "--device", type=Path, action="append", default=[], help="a disk file, disk 0 first"
    )
    parser.add_argument("--control", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="records per second")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--format", action="store_true", help="format blank disks first")
    parser.add_argument("--journal-size", type=int, default=DEFAULT_JOURNAL_SIZE)
    parser.add_argument("--follow", type=Path, default=None, help="state file of a followed VM")
    args = parser.parse_args(argv)
    exports = tuple(name for name in args.exports.split(",") if name)
    if args.device and (args.nbd_socket or exports):
        parser.error("give either --device or --nbd-socket and --exports, not both")
    if not args.device and not (args.nbd_socket and exports):
        parser.error("--nbd-socket and --exports (at least one name) or --device are needed")
    if args.rate < 0:
        parser.error("--rate must be >= 0")
    return Options(
        args.nbd_socket, exports, args.control, args.state, args.rate, args.seed,
        args.format, args.journal_size, args.follow, tuple(args.device),
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the workload until SIGTERM (0) or a failure (1, message on stderr)."""
    options = parse_args(argv)
    signalled: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: signalled.append(number))
    try:
        return _run(options, signalled)
    except SiteRecoveryError as e:
        print(f"workload: {e}", file=sys.stderr, flush=True)
        return 1


def _run(options: Options, signalled: list[int]) -> int:
    """Connect, open the journal, serve; ``signalled`` fills when SIGTERM/SIGINT come."""
    devices: list[BlockDevice] = []
    try:
        _open_devices(options, devices)
        writer = _open_writer(devices, options)
        workload = Workload(writer, rate=options.rate, follow=options.follow)
        return _serve(workload, options, signalled)
    finally:
        for device in devices:
            device.close()


def _open_devices(options: Options, devices: list[BlockDevice]) -> None:
    """Append the disks of ``options`` to ``devices``, disk 0 first (the caller
    closes them, even when one fails to open)."""
    for path in options.devices:
        devices.append(FileDevice.open(path, writable=True))
    if options.nbd_socket is None:
        return
    from siterecovery.disk.nbd import NbdDevice  # Lazy: libnbd only where NBD is used.

    for export in options.exports:
        devices.append(NbdDevice.connect(options.nbd_socket, export, writable=True))


def _open_writer(devices: Sequence[BlockDevice], options: Options) -> JournalWriter:
    if options.format and read_superblock(devices[0]) is None:
        seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(8))
        format_disks(devices, seed=seed, journal_size=options.journal_size)
    writer = JournalWriter.open(devices)
    if options.seed is not None and options.seed != writer.superblock.seed:
        print(
            f"workload: --seed {options.seed} ignored: the disks were formatted "
            f"with seed {writer.superblock.seed}",
            file=sys.stderr,
            flush=True,
        )
    return writer


def _serve(workload: Workload, options: Options, signalled: list[int]) -> int:
    saver = _StateFile(options.state)
    saver.save(workload.status(), force=True)  # A bad --state path fails before any write.
    server = _bind_control(options.control, workload)
    threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
    try:
        writer = threading.Thread(target=workload.run, name="writer", daemon=True)
        writer.start()
        print(f"workload: running, seq {workload.status()['seq']}", flush=True)
        stuck = _supervise(workload, writer, saver, signalled)
    finally:
        server.shutdown()
        server.server_close()
        options.control.unlink(missing_ok=True)
    return _exit_status(workload, options, stuck)


def _supervise(
    workload: Workload, writer: threading.Thread, saver: _StateFile, signalled: list[int]
) -> bool:
    """Save the state while the writer runs; stop it once ``signalled`` fills.

    Returns True when the writer did not finish within STOP_TIMEOUT of a stop.
    """
    stop_deadline = float("inf")
    while writer.is_alive() and time.monotonic() < stop_deadline:
        writer.join(_POLL * 5)
        if signalled and stop_deadline == float("inf"):
            workload.stop()
            stop_deadline = time.monotonic() + STOP_TIMEOUT
        saver.save(workload.status())
    saver.save({**workload.status(), "running": False}, force=True)
    return writer.is_alive()


def _exit_status(workload: Workload, options: Options, stuck: bool) -> int:
    if stuck:
        print("workload: the record in flight did not complete; exiting", file=sys.stderr)
        return 1
    if workload.error is not None:
        disks = options.nbd_socket or ", ".join(map(str, options.devices))
        what = "the NBD server at" if options.nbd_socket else "the disks"
        print(
            f"workload: {what} {disks} failed, stopping: {workload.error}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    print(f"workload: stopped at seq {workload.status()['seq']}", flush=True)
    return 0


class _StateFile:
    """The ``--state`` JSON file, replaced atomically, at most every STATE_INTERVAL."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._saved: dict[str, Any] | None = None
        self._at = 0.0

    def save(self, state: dict[str, Any], *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (state == self._saved or now - self._at < STATE_INTERVAL):
            return
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(state, sort_keys=True) + "\n")
            tmp.replace(self._path)
        except OSError as e:
            raise GuestError(detail=f"cannot save the state to {self._path}: {e}") from e
        self._saved, self._at = state, now


if __name__ == "__main__":
    sys.exit(main())
