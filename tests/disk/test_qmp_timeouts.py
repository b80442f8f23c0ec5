"""QMP timeouts against a real qemu-storage-daemon made deaf with SIGSTOP: the
error names the process, idempotent queries are retried, others are not."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from siterecovery.disk import qsd
from siterecovery.disk.qmp import IDEMPOTENT_ATTEMPTS, QmpClient
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.domain.errors import DiskError

from .support import NODE, Served, read


@contextmanager
def _client(served: Served, timeout: float) -> Iterator[QmpClient]:
    """A client of its own with a short timeout (the monitor serves one at a time)."""
    daemon = served.daemon
    daemon._close_qmp()
    client = QmpClient.connect(daemon.qmp_socket, timeout, name=daemon.describe())
    try:
        yield client
    finally:
        client.close()


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _bitmaps(client: QmpClient) -> list[str]:
    nodes = client.execute("query-named-block-nodes", flat=True)
    node = next(n for n in nodes if n["node-name"] == NODE)
    return [b["name"] for b in node.get("dirty-bitmaps", [])]


def test_a_timeout_names_the_daemon_that_did_not_answer(served: Served) -> None:
    daemon = served.daemon
    with _client(served, timeout=0.3) as client, _stopped(daemon.pid):
        started = time.monotonic()
        with pytest.raises(DiskError) as caught:
            client.execute("query-block-exports")
        waited = time.monotonic() - started
    message = str(caught.value)
    assert f"qemu-storage-daemon pid {daemon.pid}" in message
    assert str(daemon.qmp_socket) in message and "'query-block-exports'" in message
    assert f"{IDEMPOTENT_ATTEMPTS} attempts)" in message and "in time" in message
    assert waited >= IDEMPOTENT_ATTEMPTS * 0.3


def test_a_command_that_is_not_idempotent_is_sent_once(served: Served) -> None:
    daemon = served.daemon
    with _client(served, timeout=0.3) as client:
        with _stopped(daemon.pid), pytest.raises(DiskError, match="1 attempt\\)"):
            client.execute("block-dirty-bitmap-add", node=NODE, name="late")
        # qemu ran it once it woke up (sending it again would have failed: it
        # exists); its late reply is dropped and the session goes on.
        deadline = time.monotonic() + 10
        while "late" not in _bitmaps(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _bitmaps(client) == ["late"]


def test_an_idempotent_query_is_retried_until_the_daemon_answers(served: Served) -> None:
    daemon = served.daemon
    with _client(served, timeout=1.0) as client:
        os.kill(daemon.pid, signal.SIGSTOP)
        waker = threading.Timer(1.5, os.kill, (daemon.pid, signal.SIGCONT))
        waker.start()
        try:
            started = time.monotonic()
            exports = client.execute("query-block-exports")
            waited = time.monotonic() - started
        finally:
            waker.join()
            os.kill(daemon.pid, signal.SIGCONT)
        assert [e["id"] for e in exports] == [NODE]
        assert waited > 1.0  # the first attempt timed out; a later one was answered
        assert client.execute("query-block-exports") == exports


def test_a_new_daemon_whose_monitor_stays_silent_is_replaced(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first daemon spawned is stopped once its monitor socket exists (it
    accepts the connection, then never greets): start kills it, spawns a fresh
    one, and that one serves the disk with the bytes written before."""
    data = os.urandom(64 * 1024)
    with served.open() as device:
        device.write(0, data)
    served.daemon.stop()
    silenced = _silence_spawns(monkeypatch, handshake=0.5, first_only=True)
    daemon = StorageDaemon.start(served.daemon.run_dir, [DiskSpec(NODE, served.image)])
    try:
        assert silenced and daemon.pid != silenced[0]
        assert not _alive(silenced[0])
        assert (daemon.run_dir / "qsd.pid").read_text().strip() == str(daemon.pid)
        with Served(daemon, served.image).open(writable=False) as device:
            assert read(device, 0, len(data)) == data
    finally:
        daemon.stop()


def test_a_daemon_that_never_answers_is_an_error_that_leaves_nothing_running(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    served.daemon.stop()
    spawned = _silence_spawns(monkeypatch, handshake=0.3, first_only=False)
    run_dir = served.daemon.run_dir
    with pytest.raises(DiskError, match="never answered on QMP") as caught:
        StorageDaemon.start(run_dir, [DiskSpec(NODE, served.image)])
    assert len(spawned) == qsd.START_ATTEMPTS
    assert not any(_alive(pid) for pid in spawned)
    # The stop lands before its greeting or, on a loaded machine, just after it:
    # either way the monitor never answered, and the message says which step.
    said = str(caught.value)
    assert "sent no greeting" in said or "did not answer 'qmp_capabilities'" in said, said
    assert StorageDaemon.attach(run_dir) is None and not (run_dir / "qsd.pid").exists()


def _silence_spawns(
    monkeypatch: pytest.MonkeyPatch, *, handshake: float, first_only: bool
) -> list[int]:
    """Make new daemons (the first only, or every one) stop with SIGSTOP once
    their monitor socket exists, with a ``handshake`` timeout; their pids."""
    real_spawn = StorageDaemon._spawn.__func__  # type: ignore[attr-defined]
    silenced: list[int] = []

    def spawn(cls: type[StorageDaemon], run_dir: Path, detached: bool) -> StorageDaemon:
        daemon = real_spawn(cls, run_dir, detached)
        if not (first_only and silenced):
            deadline = time.monotonic() + 10
            while not daemon.qmp_socket.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(daemon.pid, signal.SIGSTOP)
            silenced.append(daemon.pid)
        return daemon

    monkeypatch.setattr(qsd, "HANDSHAKE_TIMEOUT", handshake)
    monkeypatch.setattr(StorageDaemon, "_spawn", classmethod(spawn))
    return silenced


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[-1][0] != "Z"
