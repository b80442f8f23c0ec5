"""The start of a connection: TLS, then HELLO → WELCOME (see :mod:`siterecovery.wire`).

Also where the receiver's ERROR documents become our errors again.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from siterecovery.domain.errors import SiteRecoveryError, WireError, error_from_dict
from siterecovery.wire.frames import (
    Closed,
    Connection,
    CorruptHeader,
    CorruptPayload,
    Kind,
    check_proof,
    derive_keys,
)

if TYPE_CHECKING:
    from siterecovery.keys import SecretKey

VERSION = 2
"""2: windows and go-back-N, HELLO's ``ticket`` and ``stream``."""


@dataclass(frozen=True, slots=True)
class Welcome:
    """What the receiver said when we connected.

    ``created``: it created the target for this sync (the target reads as
    zeroes wherever nothing was written since). ``resume_offset``: the last
    checkpoint marked for our ``job`` (0 when none).
    """

    size: int
    created: bool
    resume_offset: int


@dataclass(frozen=True, slots=True)
class Hello:
    """What every connection of a device (and its clones) says in its HELLO."""

    peer: str
    size: int
    job: str
    key: SecretKey | None
    compress: bool
    ticket: str | None


def wrap(context: ssl.SSLContext, sock: socket.socket, peer: str) -> ssl.SSLSocket:
    """The TLS client side of ``sock`` (handshake done); a pin mismatch is a WireError."""
    try:
        return context.wrap_socket(sock)
    except ssl.SSLCertVerificationError as e:
        sock.close()
        detail = (
            f"TLS: the receiver's certificate is not the one pinned for it "
            f"({e.verify_message}); refusing to send"
        )
        raise WireError(peer=peer, detail=detail) from None
    except OSError as e:  # ssl.SSLError included: a reset, or a receiver without TLS.
        sock.close()
        raise Closed(f"TLS handshake with {peer} failed (does it use TLS?): {e}") from e


def handshake(conn: Connection, params: Hello, stream: str) -> Welcome:
    """HELLO → WELCOME; then every later frame is sealed (with a key) and maybe compressed.

    Raises Closed or CorruptHeader when the connection broke (worth trying
    again), the receiver's error when it refused.
    """
    client_random = os.urandom(16)
    hello = {
        "version": VERSION,
        "size": params.size,
        "job": params.job,
        "key": params.key.fingerprint if params.key else None,
        "random": client_random.hex(),
        "ticket": params.ticket,
        "stream": stream,
    }
    conn.send(Kind.HELLO, parts=[json.dumps(hello).encode()])
    try:
        reply = conn.recv()
    except CorruptPayload as e:
        raise CorruptHeader(f"damaged answer to HELLO: {e}") from None
    if reply.kind is Kind.ERROR:
        raise remote_error(reply.payload, params.peer)
    if reply.kind is not Kind.WELCOME:
        raise WireError(peer=params.peer, detail=f"expected WELCOME, got {reply.kind.name}")
    doc = json.loads(bytes(reply.payload))
    send_key = recv_key = None
    if params.key is not None:
        server_random = bytes.fromhex(doc["random"])
        keys = derive_keys(params.key.material, client_random, server_random)
        check_proof(keys.to_client, server_random, bytes.fromhex(doc["proof"]), params.peer)
        send_key, recv_key = keys.to_server, keys.to_client
    conn.configure(send_key=send_key, recv_key=recv_key, compress=params.compress)
    return Welcome(
        size=int(doc["size"]), created=bool(doc["created"]), resume_offset=int(doc["resume"])
    )


def remote_error(payload: memoryview, peer: str) -> SiteRecoveryError:
    """The receiver's error document rebuilt as our error class of the same code."""
    try:
        doc: dict[str, Any] = json.loads(bytes(payload))
        code, message = str(doc["code"]), str(doc["message"])
    except (ValueError, KeyError, TypeError):
        return WireError(peer=peer, detail="unreadable ERROR frame")
    error = error_from_dict(doc)
    return error if error is not None else WireError(peer=peer, detail=f"{code}: {message}")
