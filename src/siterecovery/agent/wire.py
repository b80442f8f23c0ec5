"""An agent's wire port: where other agents send the points it receives.

One :class:`~siterecovery.wire.server.WireServer` on TLS with the agent's own
certificate, serving every open receipt of this site under its one-time
ticket (``sites/local.py: InProcessAgent.receive_point``). A sender learns
the address, the certificate to pin and the ticket from the engine, over the
engine's authenticated channel; a connection without a registered ticket is
refused before any disk is touched. A ticket registered with a key (the
item's, handed to both agents by the engine for this transfer) refuses a
sender that does not seal its frames with the same key.
"""

from __future__ import annotations

import threading

from siterecovery.agent import tls
from siterecovery.disk.base import BlockDevice
from siterecovery.keys import SecretKey
from siterecovery.wire import address as addresses
from siterecovery.wire.server import WireServer


class AgentWire:
    """The wire endpoint of an agent (``sites.local.WireEndpoint``)."""

    def __init__(self, identity: tls.Identity, host: str, port: int = 0) -> None:
        self._cert_pem = identity.cert_pem
        self._server = WireServer(tls=tls.server_context(identity))
        bracketed = f"[{host}]" if ":" in host else host
        where = addresses.parse(f"tcp://{bracketed}:{port}")
        self._listener, bound = addresses.listen(where)
        self._address = str(bound)
        self._thread = threading.Thread(
            target=self._server.serve, args=(self._listener,), name="agent-wire", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        return self._address

    @property
    def cert_pem(self) -> str | None:
        return self._cert_pem

    def register(
        self,
        ticket: str,
        device: BlockDevice,
        *,
        key: SecretKey | None = None,
        compress: bool = False,
    ) -> None:
        self._server.register(
            ticket, lambda size: (device.clone(), False), key=key, compress=compress
        )

    def unregister(self, ticket: str) -> None:
        self._server.unregister(ticket)

    def stop(self) -> None:
        self._server.stop()
        self._thread.join(timeout=10)
        self._listener.close()
