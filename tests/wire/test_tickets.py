"""One WireServer, many transfers: each chosen by the ticket in HELLO.

A sender without the right ticket is refused before any disk is opened;
two transfers run at the same time through the same listener.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path

import pytest

from siterecovery.agent.tls import Identity, client_context, server_context
from siterecovery.disk.base import BlockDevice
from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice
from siterecovery.disk.open import open_target
from siterecovery.domain.errors import AgentUnauthorized, InvalidInput
from siterecovery.replication.sync import SyncMode, SyncOptions, sync
from siterecovery.wire.client import RemoteDevice
from siterecovery.wire.server import OpenTarget

from .conftest import SIZE, StartServer, scatter


class Targets:
    """``open_target`` callbacks that also note which targets were opened."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self.opened: list[Path] = []

    def of(self, path: Path) -> OpenTarget:
        def opened(size: int) -> tuple[BlockDevice, bool]:
            self.opened.append(path)
            return open_target(str(path), self._stack, size=size)

        return opened


def test_two_transfers_share_one_tls_listener(
    workdir: Path, wire_server: StartServer, identities: tuple[Identity, Identity]
) -> None:
    server, where = wire_server(tls=server_context(identities[0]))
    tls = client_context(identities[0].cert_pem)
    with ExitStack() as stack:
        targets = Targets(stack)
        for name in ("a", "b"):
            scatter(workdir / f"src-{name}.raw", seed=ord(name))
            server.register(f"ticket-{name}", targets.of(workdir / f"dst-{name}.raw"))
        errors: list[BaseException] = []

        def send(name: str) -> None:
            try:
                with FileDevice.open(workdir / f"src-{name}.raw") as src, RemoteDevice.connect(
                    where, size=SIZE, ticket=f"ticket-{name}", tls=tls
                ) as dst:  # fmt: skip
                    sync(src, dst, SyncOptions(SyncMode.FULL, threads=2, target_is_blank=True))
                    assert dst.disk_digest() == disk_digest(src)
                    dst.done()
            except BaseException as e:
                errors.append(e)

        senders = [threading.Thread(target=send, args=(name,)) for name in ("a", "b")]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join()
        assert not errors, errors
        assert server.wait("ticket-a", 0) and server.wait("ticket-b", 0)
        assert sorted(p.name for p in targets.opened) == ["dst-a.raw", "dst-b.raw"]
        for name in ("a", "b"):
            counts = server.unregister(f"ticket-{name}")
            assert counts.jobs_done == 1 and counts.bytes_written > 0


def test_a_sender_without_the_ticket_is_refused_before_any_disk(
    workdir: Path, wire_server: StartServer
) -> None:
    server, where = wire_server()
    with ExitStack() as stack:
        targets = Targets(stack)
        server.register("the-ticket", targets.of(workdir / "dst.raw"))
        for ticket in ("the-tickes", None, ""):
            with pytest.raises(AgentUnauthorized) as refused:
                RemoteDevice.connect(where, size=SIZE, ticket=ticket)
            assert refused.value.code == "AGENT_UNAUTHORIZED" and refused.value.fields["reason"]
        assert targets.opened == [] and not (workdir / "dst.raw").exists()
        with RemoteDevice.connect(where, size=SIZE, ticket="the-ticket") as dst:
            assert dst.welcome.created
            dst.write(0, memoryview(b"x" * 4096))
            dst.flush()
            counts = server.unregister("the-ticket")  # Hangs up on dst, waits for its session.
            assert counts.bytes_written == 4096 and counts.sessions == 1
            with pytest.raises(AgentUnauthorized):  # dst reconnects: refused now.
                dst.write(4096, memoryview(b"y" * 4096))
                dst.flush()
        with pytest.raises(AgentUnauthorized):
            RemoteDevice.connect(where, size=SIZE, ticket="the-ticket")
        with pytest.raises(InvalidInput):
            server.register("", targets.of(workdir / "other.raw"))
        server.register("again", targets.of(workdir / "other.raw"))
        with pytest.raises(InvalidInput, match="already"):
            server.register("again", targets.of(workdir / "other.raw"))
