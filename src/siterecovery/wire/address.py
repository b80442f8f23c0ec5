"""Where a receiver listens: ``tcp://HOST:PORT`` or ``unix:PATH``.

:func:`parse` validates a spec once; :func:`dial` and :func:`listen` make
the sockets (TCP without Nagle's delay, so small replies leave at once).
:func:`tune` makes a TCP connection notice a dead or stuck peer within about
:data:`STALL_SECONDS` instead of blocking for good: keepalive probes when
idle, ``TCP_USER_TIMEOUT`` for data left unacknowledged, ``SO_SNDTIMEO``
for a peer that stops reading (a send blocked that long fails).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from siterecovery.domain.errors import InvalidInput, WireError

SCHEMES = ("tcp://", "unix:")
STALL_SECONDS = 60
"""How long a TCP peer may stay silent with data owed, or unreachable, before we hang up."""


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP host and port, or a unix socket path (``path`` set, ``host`` empty)."""

    host: str = ""
    port: int = 0
    path: Path | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def is_address(spec: str) -> bool:
    """Whether ``spec`` names a receiver (rather than an image or an NBD URL)."""
    return spec.startswith(SCHEMES)


def parse(spec: str) -> Address:
    """``tcp://HOST:PORT`` (port 0 = any, for listening) or ``unix:PATH``."""
    if spec.startswith("unix:"):
        path = spec.removeprefix("unix:").removeprefix("//")
        if not path:
            raise InvalidInput(field="address", reason=f"'{spec}' has no socket path")
        return Address(path=Path(path))
    parts = urlsplit(spec)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise InvalidInput(field="address", reason=f"'{spec}' is not tcp://HOST:PORT or unix:PATH")
    return Address(host=parts.hostname, port=port)


def dial(address: Address, timeout: float = 10.0) -> socket.socket:
    """A connected stream socket (blocking once connected)."""
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(str(address.path))
        else:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            tune(sock)
    except OSError as e:
        raise WireError(peer=str(address), detail=f"cannot connect: {e.strerror or e}") from e
    sock.settimeout(None)
    return sock


def tune(sock: socket.socket) -> None:
    """A connected TCP socket: no Nagle delay, and a stalled peer detected (module doc)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", STALL_SECONDS, 0))
    with contextlib.suppress(AttributeError, OSError):  # Linux only.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, STALL_SECONDS // 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, STALL_SECONDS // 6)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, STALL_SECONDS * 1000)


def listen(address: Address) -> tuple[socket.socket, Address]:
    """A listening socket and the address it really got (port 0 picks one)."""
    try:
        if address.path is not None:
            address.path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(address.path))
        else:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
        sock.listen(64)
    except OSError as e:
        raise WireError(peer=str(address), detail=f"cannot listen: {e.strerror or e}") from e
    if address.path is not None:
        return sock, address
    return sock, Address(host=address.host, port=sock.getsockname()[1])
