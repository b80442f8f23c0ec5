"""Fixtures of the wire tests: real receivers on loopback TCP or unix sockets.

Each receiver serves in a thread of the test process and is stopped, joined
and closed at teardown. Images are small sparse raw files in a short private
directory (unix socket paths must stay under 107 bytes).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.file import create_raw
from siterecovery.disk.open import open_target
from siterecovery.keys import SecretKey
from siterecovery.wire import address
from siterecovery.wire.server import Receiver

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
    """``receive(target, *, key=None, transport="tcp", once=False)`` starts a receiver."""
    started: list[tuple[Receiver, threading.Thread, ExitStack]] = []

    def start(
        target: Path, *, key: SecretKey | None = None, transport: str = "tcp", once: bool = False
    ) -> Served:
        stack = ExitStack()
        where = "tcp://127.0.0.1:0" if transport == "tcp" else f"unix:{workdir / 'rx.sock'}"
        sock, bound = address.listen(address.parse(where))
        stack.callback(sock.close)
        receiver = Receiver(lambda size: open_target(str(target), stack, size=size), key=key,
                            once=once)  # fmt: skip
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
