"""Fixtures of the wire tests: real receivers on loopback TCP or unix sockets.

Each receiver serves in a thread of the test process and is stopped, joined
and closed at teardown. Images are small sparse raw files in a short private
directory (unix socket paths must stay under 107 bytes).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.agent.tls import Identity, make_identity
from siterecovery.disk.base import BlockDevice
from siterecovery.disk.file import create_raw
from siterecovery.disk.open import open_target
from siterecovery.keys import SecretKey
from siterecovery.wire import address
from siterecovery.wire.server import Receiver, WireServer

from .proxy import Proxy

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB
ZEROED = (16 * MiB, 17 * MiB)
"""Written with zeroes in every source image: must stay a hole on the target."""


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="srw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def scatter(path: Path, seed: int, count: int = 20, size: int = SIZE) -> None:
    """A sparse raw image: ``count`` random-data extents, then :data:`ZEROED` written."""
    create_raw(path, size)
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(count):
            length = rng.randrange(4 * KiB, MiB, 4 * KiB)
            os.pwrite(fd, rng.randbytes(length), rng.randrange(0, size - length, 4 * KiB))
        os.pwrite(fd, bytes(ZEROED[1] - ZEROED[0]), ZEROED[0])
    finally:
        os.close(fd)


def data_ranges(dev: BlockDevice) -> list[tuple[int, int]]:
    return [(e.start, e.end) for e in dev.extents() if not e.zero]


@dataclass
class Served:
    """A receiver serving ``target`` at ``address`` from a thread."""

    receiver: Receiver
    address: str
    target: Path


StartReceiver = Callable[..., Served]


@pytest.fixture
def receive(workdir: Path) -> Iterator[StartReceiver]:
    """``receive(target, *, key=None, transport="tcp", once=False, tls=None, wrap=None)``
    starts a receiver (``wrap`` wraps its target, for test doubles)."""
    started: list[tuple[WireServer, threading.Thread, ExitStack]] = []

    def start(
        target: Path,
        *,
        key: SecretKey | None = None,
        transport: str = "tcp",
        once: bool = False,
        tls: ssl.SSLContext | None = None,
        wrap: Callable[[BlockDevice], BlockDevice] | None = None,
    ) -> Served:
        stack = ExitStack()
        where = "tcp://127.0.0.1:0" if transport == "tcp" else f"unix:{workdir / 'rx.sock'}"
        sock, bound = address.listen(address.parse(where))
        stack.callback(sock.close)

        def opened(size: int) -> tuple[BlockDevice, bool]:
            dev, created = open_target(str(target), stack, size=size)
            return (dev if wrap is None else wrap(dev)), created

        receiver = Receiver(opened, key=key, once=once, tls=tls)
        thread = threading.Thread(target=receiver.serve, args=(sock,), name="test-receiver")
        thread.start()
        started.append((receiver, thread, stack))
        return Served(receiver, str(bound), target)

    yield start
    for receiver, thread, stack in started:
        receiver.stop()
        thread.join(30)
        receiver.close()
        stack.close()


StartServer = Callable[..., tuple[WireServer, str]]


@pytest.fixture
def wire_server() -> Iterator[StartServer]:
    """``wire_server(tls=None)`` starts a WireServer (no transfer yet) and its address."""
    started: list[tuple[WireServer, threading.Thread, socket.socket]] = []

    def start(tls: ssl.SSLContext | None = None) -> tuple[WireServer, str]:
        sock, bound = address.listen(address.parse("tcp://127.0.0.1:0"))
        server = WireServer(tls=tls)
        thread = threading.Thread(target=server.serve, args=(sock,), name="test-wire-server")
        thread.start()
        started.append((server, thread, sock))
        return server, str(bound)

    yield start
    for server, thread, sock in started:
        server.stop()
        thread.join(30)
        server.close()
        sock.close()


@pytest.fixture
def proxy() -> Iterator[Callable[..., Proxy]]:
    """``proxy(upstream, cut_after=None)``: a TCP proxy (see proxy.py), closed at teardown."""
    started: list[Proxy] = []

    def start(upstream: str, *, cut_after: int | None = None) -> Proxy:
        started.append(Proxy(upstream, cut_after=cut_after))
        return started[-1]

    yield start
    for one in started:
        one.close()


@pytest.fixture(scope="session")
def identities() -> Iterator[tuple[Identity, Identity]]:
    """Two agent identities (certificate and key): the receiver's, and a stranger's."""
    path = Path(tempfile.mkdtemp(prefix="srw-tls-", dir="/tmp"))
    yield make_identity(path / "receiver", "receiver"), make_identity(path / "other", "other")
    shutil.rmtree(path, ignore_errors=True)
