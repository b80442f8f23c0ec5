"""The receiving side: apply what senders stream to target disks.

A :class:`WireServer` listens once (TLS optional) and serves many transfers
at a time, each registered under a ticket (:meth:`WireServer.register`) and
selected by the ticket a sender puts in its HELLO; an unknown or absent
ticket is answered ERROR ``AGENT_UNAUTHORIZED`` before any disk is touched.
A :class:`Receiver` is a server of one transfer that needs no ticket
(``siterecovery sync-receive``).

Every connection has its own thread (a :class:`~siterecovery.wire.session.Session`)
and its own clone of its transfer's target. A target is opened on the first
HELLO of its transfer, when the source's size is known, so a missing image
can be created at the right size. Checkpoints marked by a sender are kept per
job for the transfer's lifetime: a sender that died reconnects and resumes
from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from siterecovery.disk.base import BlockDevice
from siterecovery.domain.errors import (
    AgentUnauthorized,
    DecryptionFailed,
    DiskError,
    InvalidInput,
)
from siterecovery.keys import SecretKey
from siterecovery.wire import address as addresses
from siterecovery.wire.frames import Connection, Stream
from siterecovery.wire.session import Session

OpenTarget = Callable[[int], tuple[BlockDevice, bool]]
"""``open_target(size)``: the target, writable, of at least ``size`` bytes, and
whether it was created just now (then it reads as zeroes)."""

ANONYMOUS = ""
"""The ticket of a Receiver's one transfer: what a HELLO without ticket selects."""

_ACCEPT_POLL = 0.1
HANDSHAKE_TIMEOUT = 30.0
"""Seconds a TLS handshake may take before the connection is dropped."""


@dataclass(frozen=True, slots=True)
class ReceiverCounts:
    """What a transfer's receiver did so far (bytes and events)."""

    sessions: int = 0
    frames: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    corrupt_frames: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    jobs_done: int = 0


@dataclass(slots=True)
class _Totals:
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, **values: int) -> None:
        for name, value in values.items():
            self.counts[name] = self.counts.get(name, 0) + value


def _digest(ticket: str) -> bytes:
    return hashlib.sha256(ticket.encode()).digest()


class _Transfer:
    """One registered target: opened at its first HELLO, its marks, counters and sessions.

    Thread-safe.
    """

    def __init__(
        self, ticket: str, open_target: OpenTarget, key: SecretKey | None, compress: bool
    ) -> None:
        self.digest = _digest(ticket)
        self.key = key
        self.compress = compress
        self._open_target = open_target
        self._lock = threading.Lock()
        self.target: BlockDevice | None = None
        self._created = False
        self._marks: dict[str, int] = {}
        self._totals = _Totals()
        self.finished = threading.Event()
        self._sessions: set[Session] = set()
        self._retired = False

    @property
    def counts(self) -> ReceiverCounts:
        with self._lock:
            return ReceiverCounts(**self._totals.counts)

    def welcome(self, hello: dict[str, Any], peer: str) -> tuple[BlockDevice, dict[str, Any]]:
        """Check a HELLO's key; the session's clone of the target and the WELCOME document."""
        self._check_key(hello.get("key"), peer)
        size = int(hello["size"])
        with self._lock:
            if self._retired:
                raise AgentUnauthorized(reason="this transfer was withdrawn")
            if self.target is None:
                self.target, self._created = self._open_target(size)
            target, created = self.target, self._created
            resume = self._marks.get(str(hello.get("job", "")), 0)
            self._totals.add(sessions=1)
        if target.size < size:
            raise DiskError(
                detail=f"the target ({target.size} bytes) is smaller than the source ({size} bytes)"
            )
        doc = {"size": target.size, "created": created, "resume": resume}
        return target.clone(), doc

    def _check_key(self, fingerprint: str | None, peer: str) -> None:
        ours = self.key.fingerprint if self.key else None
        if fingerprint == ours:
            return
        if self.key is None:
            reason = "the sender encrypts but the receiver has no key (start it with --key)"
        elif fingerprint is None:
            reason = f"the receiver requires encryption with key '{self.key.name}'"
        else:
            reason = f"key fingerprints differ: sender {fingerprint}, receiver {ours}"
        raise DecryptionFailed(peer=peer, reason=reason)

    def mark(self, job: str, offset: int) -> None:
        with self._lock:
            self._marks[job] = offset

    def finish(self, job: str) -> None:
        with self._lock:
            self._marks.pop(job, None)
            self._totals.add(jobs_done=1)
        self.finished.set()

    def count(self, **values: int) -> None:
        with self._lock:
            self._totals.add(**values)

    def joined(self, session: Session) -> None:
        with self._lock:
            self._sessions.add(session)

    def left(self, session: Session, conn: Connection) -> None:
        with self._lock:
            self._sessions.discard(session)
            self._totals.add(bytes_received=conn.bytes_received, bytes_sent=conn.bytes_sent)
            last = self._retired and not self._sessions
        if last:
            self.close()

    def retire(self) -> None:
        """No new session; hang up on the current ones, wait for them, close the target."""
        with self._lock:
            self._retired = True
            sessions = list(self._sessions)
        for session in sessions:
            session.hang_up()
        for session in sessions:
            session.ended.wait()
        self.close()

    def close(self) -> None:
        with self._lock:
            target, self.target = self.target, None
        if target is not None:
            target.close()


class WireServer:
    """Serves registered transfers to senders, each selected by its ticket. Thread-safe.

    ``tls``: a server context (``agent.tls.server_context``) wrapping every
    accepted connection; the handshake runs in the connection's thread.
    """

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._transfers: dict[bytes, _Transfer] = {}
        self._streams: dict[tuple[bytes, str], Session] = {}
        self._active = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[Any] = set()

    # Transfers.

    def register(
        self,
        ticket: str,
        open_target: OpenTarget,
        *,
        key: SecretKey | None = None,
        compress: bool = False,
    ) -> None:
        """Serve ``open_target`` to senders presenting ``ticket`` (a secret, not empty).

        ``key``: senders must seal frames with it. ``compress``: READ replies
        are compressed (kept when smaller). Raises InvalidInput when the
        ticket is empty or registered already.
        """
        if not ticket:
            raise InvalidInput(field="ticket", reason="a ticket cannot be empty")
        self._add(_Transfer(ticket, open_target, key, compress))

    def _add(self, transfer: _Transfer) -> _Transfer:
        with self._lock:
            if transfer.digest in self._transfers:
                raise InvalidInput(field="ticket", reason="that ticket is registered already")
            self._transfers[transfer.digest] = transfer
        return transfer

    def unregister(self, ticket: str) -> ReceiverCounts:
        """Withdraw a ticket: refuse it from now on, hang up on its senders and return
        once their sessions ended and its target is closed (do not call it from a
        session). Its counts; zero counts for an unknown ticket."""
        with self._lock:
            transfer = self._transfers.pop(_digest(ticket), None)
        if transfer is None:
            return ReceiverCounts()
        transfer.retire()
        return transfer.counts

    def counts_of(self, ticket: str) -> ReceiverCounts:
        """What the transfer of ``ticket`` received so far (zero counts when unknown)."""
        with self._lock:
            transfer = self._transfers.get(_digest(ticket))
        return ReceiverCounts() if transfer is None else transfer.counts

    def wait(self, ticket: str, timeout: float | None = None) -> bool:
        """Wait until a sender of ``ticket`` said DONE; False on timeout or unknown ticket."""
        with self._lock:
            transfer = self._transfers.get(_digest(ticket))
        return transfer is not None and transfer.finished.wait(timeout)

    # Serving.

    def serve(self, listener: socket.socket) -> None:
        """Accept connections until :meth:`stop`. Joins every session before returning;
        does not close ``listener``."""
        listener.settimeout(_ACCEPT_POLL)
        while not self._stop.is_set() and not self._done():
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(None)
            if sock.family != socket.AF_UNIX:
                addresses.tune(sock)
            stream: socket.socket = sock
            if self._tls is not None:
                stream = self._tls.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False)  # fmt: skip
            self._start(stream, _peer_name(peer))
        for thread in self._threads:
            thread.join()

    def _done(self) -> bool:
        return False

    def _start(self, stream: socket.socket, peer: str) -> None:
        with self._lock:
            self._active += 1
            self._sockets.add(stream)
        thread = threading.Thread(target=self._handle, args=(stream, peer), name=f"recv-{peer}")
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _handle(self, stream: socket.socket, peer: str) -> None:
        try:
            if isinstance(stream, ssl.SSLSocket) and not _tls_handshake(stream):
                with contextlib.suppress(OSError):
                    stream.close()
                return
            self.handle(stream, peer)
        finally:
            with self._lock:
                self._sockets.discard(stream)
                self._active -= 1

    def handle(self, stream: Stream, peer: str) -> None:
        """Serve one connection until it closes (from the calling thread)."""
        conn = Connection(stream, peer)
        session = Session(self, conn)
        try:
            session.run()
        finally:
            conn.close()

    def stop(self) -> None:
        """Make :meth:`serve` return soon: hang up on every sender. Signal-safe."""
        self._stop.set()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close every transfer's target. Call after :meth:`serve` returned."""
        with self._lock:
            transfers = list(self._transfers.values())
        for transfer in transfers:
            transfer.close()

    # For sessions.

    def find(self, ticket: object, peer: str) -> _Transfer:
        """The transfer a HELLO's ticket selects; AgentUnauthorized when none.

        Looked up by the ticket's SHA-256 and compared in constant time: the
        time taken says nothing of the registered tickets.
        """
        what = "no ticket" if not ticket else "an unknown ticket"
        refused = AgentUnauthorized(reason=f"the sender at {peer} presented {what}")
        if ticket is not None and not isinstance(ticket, str):
            raise refused
        digest = _digest(ticket or ANONYMOUS)
        with self._lock:
            transfer = self._transfers.get(digest)
        if transfer is None or not hmac.compare_digest(transfer.digest, digest):
            raise refused
        return transfer

    def fence(self, session: Session) -> None:
        """Make ``session`` the only one of its stream: end the earlier one, wait for it."""
        assert session.transfer is not None
        with self._lock:
            key = (session.transfer.digest, session.stream)
            earlier = self._streams.get(key) if session.stream else None
            if session.stream:
                self._streams[key] = session
        session.transfer.joined(session)
        if earlier is not None:
            earlier.hang_up()
            earlier.ended.wait()

    def left(self, session: Session) -> None:
        if session.transfer is None:
            return
        with self._lock:
            key = (session.transfer.digest, session.stream)
            if self._streams.get(key) is session:
                del self._streams[key]


class Receiver(WireServer):
    """Serves one target disk to senders, no ticket needed. Thread-safe.

    ``once``: :meth:`serve` returns after the first job is done (a sender
    sent DONE) and its connections closed. DIGESTS requests hash the target
    with as many threads as the sender asks for.
    """

    def __init__(
        self,
        open_target: OpenTarget,
        *,
        key: SecretKey | None = None,
        once: bool = False,
        tls: ssl.SSLContext | None = None,
        compress: bool = False,
    ) -> None:
        super().__init__(tls=tls)
        self._once = once
        self._only = self._add(_Transfer(ANONYMOUS, open_target, key, compress))

    @property
    def counts(self) -> ReceiverCounts:
        return self._only.counts

    @property
    def target(self) -> BlockDevice | None:
        """The target, once a sender said hello."""
        return self._only.target

    def _done(self) -> bool:
        with self._lock:
            return self._once and self._only.finished.is_set() and self._active == 0


def _tls_handshake(stream: ssl.SSLSocket) -> bool:
    """The server side of the TLS handshake; False when it failed (the peer is dropped)."""
    try:
        stream.settimeout(HANDSHAKE_TIMEOUT)
        stream.do_handshake()
        stream.settimeout(None)
    except (OSError, ValueError):  # ssl.SSLError included.
        return False
    return True


def _peer_name(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) or "unix"
