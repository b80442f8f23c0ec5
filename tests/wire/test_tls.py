"""TLS between the two ends: pinned certificates, and nothing readable on the wire.

What crosses is recorded by a real TCP proxy between sender and receiver
(proxy.py), as an eavesdropper on the WAN would see it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from siterecovery.agent.tls import Identity, client_context, server_context
from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice
from siterecovery.domain.errors import WireError
from siterecovery.replication.sync import SyncMode, SyncOptions, sync
from siterecovery.wire.client import RemoteDevice

from .conftest import SIZE, StartReceiver, data_ranges, scatter
from .proxy import Proxy


def probe_of(path: Path) -> bytes:
    """256 bytes of the source's first data extent: recognisable if they cross in clear."""
    with FileDevice.open(path) as src:
        probe = memoryview(bytearray(256))
        src.readinto(data_ranges(src)[0][0], probe)
    return bytes(probe)


def recorded(
    workdir: Path,
    receive: StartReceiver,
    proxy: Callable[..., Proxy],
    identity: Identity | None,
) -> bytes:
    """Sync src.raw through a recording proxy, with TLS when ``identity``; what crossed."""
    (workdir / "dst.raw").unlink(missing_ok=True)
    served = receive(workdir / "dst.raw", tls=server_context(identity) if identity else None)
    link = proxy(served.address)
    tls = client_context(identity.cert_pem) if identity else None
    src = FileDevice.open(workdir / "src.raw")
    with src, RemoteDevice.connect(link.address, size=SIZE, tls=tls) as dst:
        sync(src, dst, SyncOptions(SyncMode.FULL, threads=2, target_is_blank=True))
        assert dst.disk_digest() == disk_digest(src)
    return bytes(link.recorded)


def test_a_tls_stream_does_not_contain_the_plaintext(
    workdir: Path,
    receive: StartReceiver,
    proxy: Callable[..., Proxy],
    identities: tuple[Identity, Identity],
) -> None:
    scatter(workdir / "src.raw", seed=21)
    probe = probe_of(workdir / "src.raw")
    assert probe in recorded(workdir, receive, proxy, None)  # The recording captures data...
    secret = recorded(workdir, receive, proxy, identities[0])
    assert probe not in secret and b"SRW1" not in secret  # ...TLS hides it, frames included.
    with FileDevice.open(workdir / "src.raw") as src:
        moved = sum(end - start for start, end in data_ranges(src))
    assert len(secret) > moved // 2


def test_a_sender_pinned_to_another_certificate_is_refused(
    workdir: Path, receive: StartReceiver, identities: tuple[Identity, Identity]
) -> None:
    ours, stranger = identities
    served = receive(workdir / "dst.raw", tls=server_context(ours))
    with pytest.raises(WireError, match="not the one pinned") as refused:
        RemoteDevice.connect(served.address, size=SIZE, tls=client_context(stranger.cert_pem))
    assert refused.value.code == "WIRE_ERROR"
    with pytest.raises(WireError, match="handshake failed"):
        RemoteDevice.connect(served.address, size=SIZE)  # No TLS at all.
    assert served.receiver.target is None  # No sender reached the disk.
