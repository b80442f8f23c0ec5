"""A connection dropped mid-transfer: the sender reconnects and resends its window only.

A real TCP proxy (proxy.py) cuts the writer's connection once, in the middle
of the data; the sync goes on without restarting its pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from siterecovery.agent.tls import Identity, client_context, server_context
from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.replication.sync import SyncMode, SyncOptions, sync
from siterecovery.wire.client import FRAME_BYTES, WINDOW, RemoteDevice

from .conftest import SIZE, KiB, MiB, StartReceiver
from .proxy import Proxy

HEADERS = 4 * KiB
"""More than a frame's header and segment table."""


def dense(path: Path) -> None:
    """A source whose every byte is random data (every chunk is one DATA frame)."""
    create_raw(path, SIZE)
    with FileDevice.open(path, writable=True) as dev:
        for offset in range(0, SIZE, 4 * MiB):
            dev.write(offset, memoryview(os.urandom(4 * MiB)))


@pytest.mark.parametrize(("window", "tls"), [(4, False), (WINDOW, False), (WINDOW, True)])
def test_a_dropped_connection_resumes_and_resends_at_most_one_window(
    workdir: Path,
    receive: StartReceiver,
    proxy: Callable[..., Proxy],
    identities: tuple[Identity, Identity],
    window: int,
    tls: bool,
) -> None:
    dense(workdir / "src.raw")
    ours = identities[0]
    served = receive(workdir / "dst.raw", tls=server_context(ours) if tls else None)
    link = proxy(served.address, cut_after=SIZE // 3)  # Cuts the writer's connection, once.
    context = client_context(ours.cert_pem) if tls else None
    src = FileDevice.open(workdir / "src.raw")
    with src, RemoteDevice.connect(link.address, size=SIZE, window=window, tls=context) as dst:
        sync(src, dst, SyncOptions(SyncMode.FULL, threads=2, target_is_blank=True))
        assert dst.disk_digest() == disk_digest(src)
        counts = dst.counts
    assert link.cuts == 1 and counts.reconnects == 1
    one_window = window * (FRAME_BYTES + HEADERS)  # Chunks of 1 MiB: one per frame.
    assert 0 < counts.resent_bytes <= one_window
    written = served.receiver.counts.bytes_written
    assert SIZE <= written <= SIZE + counts.resent_bytes  # The pass did not restart.
