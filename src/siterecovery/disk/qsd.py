"""qemu-storage-daemon processes that serve VM disks over NBD.

One daemon per run directory: ``qmp.sock`` (its QMP monitor), ``nbd.sock`` (its
NBD server; each disk is exported under its node name), ``qsd.pid`` and
``qsd.log`` (its stderr). The daemon is started with only a monitor and then
configured through QMP, so no path ever goes through qemu's option syntax.

A detached daemon outlives the process that started it (a VM's disks must stay
served while our engine restarts); :meth:`StorageDaemon.attach` finds it again
from its run directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from siterecovery import processes
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qmp import DEFAULT_TIMEOUT, QmpClient
from siterecovery.domain.errors import DiskError, InvalidInput, QmpTimeout

QSD_BINARY = "qemu-storage-daemon"
START_TIMEOUT = 30.0
"""Seconds a new daemon has to answer on both sockets (generous: a loaded host)."""
STOP_TIMEOUT = 30.0
"""Seconds a SIGTERMed daemon has to close its images (and write their bitmaps)."""
HANDSHAKE_TIMEOUT = 15.0
"""Seconds a new daemon's monitor has to greet and negotiate once connected."""
START_ATTEMPTS = 3
"""How many fresh daemons are spawned when a new one's monitor stays silent."""

_PR_SET_PDEATHSIG = 1
_NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,25}$")  # + "-file" fits in 31
_MAX_SOCKET_PATH = 107
_POLL = 0.02

_T = TypeVar("_T")

_clients: dict[tuple[str, int], QmpClient] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One disk image to serve: ``node`` is both its node name and its export name.

    ``node`` is a letter then up to 25 letters, digits, ``-`` or ``_``.
    """

    node: str
    path: Path
    fmt: str = "qcow2"
    writable: bool = True

    def __post_init__(self) -> None:
        if not _NODE_NAME.match(self.node):
            raise InvalidInput(field="node", reason=f"'{self.node}' is not a valid node name")


class StorageDaemon:
    """A running (or once running) qemu-storage-daemon bound to one run directory.

    Not thread-safe except :meth:`qmp`, whose client is itself thread-safe.
    """

    def __init__(self, run_dir: Path, pid: int, process: subprocess.Popen[bytes] | None) -> None:
        self._run_dir = run_dir
        self._pid = pid
        self._process = process

    @classmethod
    def start(
        cls, run_dir: Path, disks: Sequence[DiskSpec], *, detached: bool = True
    ) -> StorageDaemon:
        """Start a daemon serving ``disks`` and wait until both sockets answer.

        ``detached`` daemons get a session of their own and outlive the caller;
        the others are SIGKILLed by the kernel when this process exits (not
        when the calling thread does: see :class:`_Keeper`).
        A new daemon whose monitor accepts the connection but stays silent
        (seen once in hundreds of starts on a loaded CI machine: greeted, then
        no answer to ``qmp_capabilities`` for a minute) holds nothing yet, no
        image is open: it is killed and a fresh one spawned, up to
        :data:`START_ATTEMPTS` daemons.
        Raises DiskError when a daemon already runs in ``run_dir`` or the new one
        fails to start (its log is in the message).
        """
        run_dir = Path(run_dir).absolute()
        run_dir.mkdir(parents=True, exist_ok=True)
        if cls.attach(run_dir) is not None:
            raise DiskError(detail=f"a storage daemon already runs in {run_dir}")
        _check_socket_path(run_dir / "nbd.sock")
        for attempt in range(1, START_ATTEMPTS + 1):
            daemon = cls._spawn(run_dir, detached)
            try:
                daemon._wait_qmp()
                break
            except QmpTimeout as e:
                daemon._discard()
                if attempt == START_ATTEMPTS:
                    raise DiskError(
                        detail=f"{START_ATTEMPTS} new {QSD_BINARY} processes in {run_dir} "
                        f"connected but never answered on QMP; the last said: {e.message}"
                    ) from e
            except BaseException:
                daemon._discard()
                raise
        try:
            daemon._configure(disks)
        except BaseException:
            daemon._discard()
            raise
        return daemon

    @classmethod
    def attach(cls, run_dir: Path) -> StorageDaemon | None:
        """The live daemon of ``run_dir``, or None (stale files are then removed)."""
        run_dir = Path(run_dir).absolute()
        pid = _read_pid(run_dir / "qsd.pid")
        if pid is not None and _is_our_daemon(pid, run_dir):
            return cls(run_dir, pid, None)
        cls(run_dir, 0, None)._remove_files()
        return None

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    @property
    def nbd_socket(self) -> Path:
        return self._run_dir / "nbd.sock"

    @property
    def qmp_socket(self) -> Path:
        return self._run_dir / "qmp.sock"

    @property
    def log_path(self) -> Path:
        return self._run_dir / "qsd.log"

    def qmp(self) -> QmpClient:
        """The connected QMP client of this daemon, shared process-wide.

        A qsd monitor serves one client at a time (a second one gets no greeting
        until the first leaves), so every object attached to the same daemon in
        this process shares one thread-safe client. Reconnects after the
        connection was lost.
        """
        key = (str(self.qmp_socket), self._pid)
        with _clients_lock:
            client = _clients.get(key)
            if client is None or client.closed:
                client = QmpClient.connect(self.qmp_socket, name=self.describe())
                _clients[key] = client
            return client

    def describe(self) -> str:
        """Which process this is, for messages: binary, pid and run directory."""
        return f"{QSD_BINARY} pid {self._pid} of {self._run_dir}"

    def is_running(self) -> bool:
        """Whether the daemon process is alive (a zombie is not)."""
        if self._process is not None:
            return self._process.poll() is None
        return processes.alive(self._pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (a clean exit keeps persistent bitmaps consistent), then
        SIGKILL after ``timeout`` seconds. Removes the run files. Idempotent."""
        self._close_qmp()
        if self.is_running():
            self._signal(signal.SIGTERM)
            if not self._wait_exit(timeout):
                self._signal(signal.SIGKILL)
                self._wait_exit(timeout)
        self._remove_files()

    def kill(self) -> None:
        """SIGKILL and wait for the exit, leaving the run files behind as a crash
        would. Idempotent."""
        self._close_qmp()
        if self.is_running():
            self._signal(signal.SIGKILL)
            self._wait_exit(START_TIMEOUT)

    def log_tail(self, limit: int = 2000) -> str:
        """The last ``limit`` characters of the daemon's stderr."""
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    @classmethod
    def _spawn(cls, run_dir: Path, detached: bool) -> StorageDaemon:
        qmp_path = str(run_dir / "qmp.sock").replace(",", ",,")
        argv = [
            QSD_BINARY,
            "--chardev", f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp0",
        ]  # fmt: skip
        with open(run_dir / "qsd.log", "ab") as log:

            def popen() -> subprocess.Popen[bytes]:
                return subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=run_dir,
                    start_new_session=detached,
                    preexec_fn=None if detached else _die_with_parent(os.getpid()),
                )

            try:
                process = popen() if detached else _KEEPER.run(popen)
            except OSError as e:
                raise DiskError(detail=f"cannot start {QSD_BINARY}: {e}") from e
        _write_pid(run_dir / "qsd.pid", process.pid)
        return cls(run_dir, process.pid, process)

    def _configure(self, disks: Sequence[DiskSpec]) -> None:
        qmp = self.qmp()
        qmp.execute(
            "nbd-server-start", addr={"type": "unix", "data": {"path": str(self.nbd_socket)}}
        )
        for disk in disks:
            _add_disk(qmp, disk)
        if disks:
            NbdDevice.connect(self.nbd_socket, disks[0].node).close()

    def _wait_qmp(self) -> None:
        """Connect to the new daemon's monitor and negotiate; the client then
        serves :meth:`qmp`. Raises QmpTimeout at once when the monitor was
        reached but stayed silent for :data:`HANDSHAKE_TIMEOUT` seconds, and
        DiskError when the process exits or no connection is possible within
        :data:`START_TIMEOUT` seconds."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            self._check_alive()
            try:
                client = QmpClient.connect(self.qmp_socket, HANDSHAKE_TIMEOUT, name=self.describe())
            except QmpTimeout:
                raise
            except DiskError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(_POLL)
                continue
            client.set_timeout(DEFAULT_TIMEOUT)
            with _clients_lock:
                _clients[(str(self.qmp_socket), self._pid)] = client
            return

    def _discard(self) -> None:
        """Kill a daemon that never served and remove its run files."""
        self.kill()
        self._remove_files()

    def _check_alive(self) -> None:
        if not self.is_running():
            raise DiskError(detail=f"{QSD_BINARY} exited at start: {self.log_tail()}")

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signum)

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL)
        return True

    def _close_qmp(self) -> None:
        with _clients_lock:
            client = _clients.pop((str(self.qmp_socket), self._pid), None)
        if client is not None:
            client.close()

    def _remove_files(self) -> None:
        for name in ("qsd.pid", "nbd.sock", "qmp.sock"):
            (self._run_dir / name).unlink(missing_ok=True)


def _add_disk(qmp: QmpClient, disk: DiskSpec) -> None:
    """blockdev-add the file and format nodes of ``disk`` and export it over NBD."""
    read_only = not disk.writable
    file_node = f"{disk.node}-file"
    file_args: dict[str, Any] = {
        "driver": "file",
        "node-name": file_node,
        "filename": str(Path(disk.path).absolute()),
        "read-only": read_only,
        "discard": "unmap",
    }
    qmp.execute("blockdev-add", **file_args)
    format_args: dict[str, Any] = {
        "driver": disk.fmt,
        "node-name": disk.node,
        "file": file_node,
        "read-only": read_only,
        "discard": "unmap",
    }
    qmp.execute("blockdev-add", **format_args)
    qmp.execute(
        "block-export-add",
        **{"type": "nbd", "id": disk.node, "node-name": disk.node, "name": disk.node},
        writable=disk.writable,
    )


class _Keeper:
    """One thread that lives as long as the process and forks the daemons that
    must die with it. The kernel's parent-death signal follows the *thread*
    that forked (prctl(2)): a daemon forked by a worker thread (an agent's
    operation, a pool thread that the pool later retires) would be killed when
    that thread ends, under the transfer still using it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._work: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None

    def run(self, function: Callable[[], _T]) -> _T:
        """``function()`` in the keeper thread; its result or its exception."""
        done: Future[_T] = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="qsd-keeper", daemon=True)
                self._thread.start()
        self._work.put((function, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            function, done = self._work.get()
            try:
                done.set_result(function())
            except BaseException as e:
                done.set_exception(e)


_KEEPER = _Keeper()


def _die_with_parent(parent_pid: int) -> Any:
    """A preexec function: SIGKILL the child when its parent goes away."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)  # The parent died before prctl took effect.

    return preexec


def _check_socket_path(path: Path) -> None:
    if len(str(path).encode()) > _MAX_SOCKET_PATH:
        raise DiskError(detail=f"socket path {path} is too long for a unix socket")


def _write_pid(path: Path, pid: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


EXIT_WAIT = 5.0
"""Seconds a dying daemon is waited for (see :func:`_is_our_daemon`)."""


def _is_our_daemon(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` is a live qemu-storage-daemon of ``run_dir`` (not a reused pid).

    A killed daemon drops its memory (an empty cmdline) before it closes its
    files: until it is gone its image locks still hold, and a new daemon on
    the same images would fail to lock them. Such a dying process is waited
    for (briefly), then reported gone."""
    deadline = time.monotonic() + EXIT_WAIT
    while True:
        if not processes.alive(pid):
            return False
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if raw or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    cmdline = raw.split(b"\0")
    qmp_path = str(run_dir / "qmp.sock").replace(",", ",,").encode()
    return Path(cmdline[0].decode()).name == QSD_BINARY and any(qmp_path in arg for arg in cmdline)
