"""QMP timeouts against a real qemu-storage-daemon made deaf with SIGSTOP: the
error names the process, idempotent queries are retried, others are not."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from siterecovery.disk.qmp import IDEMPOTENT_ATTEMPTS, QmpClient
from siterecovery.domain.errors import DiskError

from .support import NODE, Served


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
