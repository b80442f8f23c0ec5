"""The sending side: a :class:`~siterecovery.disk.base.BlockDevice` at the other end of the wire.

:class:`RemoteDevice` is the target of a sync whose disk lives with a
receiver. Besides the block-device methods it takes whole chunks in one
frame (:meth:`RemoteDevice.write_segments`), hashes blocks where the disk
lives (:meth:`RemoteDevice.block_digests`: only digests travel), and
remembers checkpoints at the receiver (:meth:`RemoteDevice.mark`), so a
later sender resumes from :attr:`Welcome.resume_offset`.

Writes (DATA, ZERO) do not wait for their ACK: up to ``window`` frames and
``window`` × :data:`FRAME_BYTES` of data are in flight per connection (a
:class:`~siterecovery.wire.window.Window`, which owns a copy of their data;
by default 32 frames and 32 MiB, enough for 640 MiB/s at 50 ms).
There is no reader thread: replies are read by the thread that uses the
device, in order, whenever some are already waiting before a frame is sent
(:meth:`Connection.poll`), and blocking for one when the window is full. Any
other request first drains the window of every clone of the device, then
waits for its own reply, so its answer reflects every write that returned
before it, through any clone: FLUSH makes them durable, MARK never
checkpoints past an unapplied write.

A NAK for ``seq`` N (the receiver applied everything before N, and will
discard what follows until N comes again) resends N and every later frame,
under the same numbers (go-back-N); so does a damaged reply, from the oldest
unanswered frame (stale answers are ignored). A lost connection (or a
corrupt header, after which the receiver hangs up) reconnects, with backoff
(:data:`BACKOFF`), and sends every unanswered frame again: DATA and ZERO
carry absolute offsets, every request is idempotent, and the receiver ends
the old connection's session before welcoming the new one (HELLO's
``stream``), so nothing of the old one lands after the new one. Bytes sent
again are at most one window per connection (``WireCounts.resent_bytes``).
A peer that goes silent is noticed by the socket (``address.tune``: about
:data:`~siterecovery.wire.address.STALL_SECONDS`), then handled as a break.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import numpy as np

from siterecovery.disk.base import Extent
from siterecovery.disk.digest import DIGEST_SIZE, Digests
from siterecovery.domain.errors import DiskError, SiteRecoveryError, WireError
from siterecovery.keys import SecretKey
from siterecovery.wire import address as addresses
from siterecovery.wire.frames import (
    Closed,
    Connection,
    CorruptHeader,
    CorruptPayload,
    Frame,
    Kind,
    Stream,
)
from siterecovery.wire.handshake import VERSION, Hello, Welcome, handshake, remote_error, wrap
from siterecovery.wire.window import Pending, Window

__all__ = ["VERSION", "WINDOW", "RemoteDevice", "Welcome", "WireCounts", "remote_error"]

ATTEMPTS = 4
"""Sends of one frame on one connection (after NAKs or damaged replies) before giving up."""
BACKOFF = (0.0, 0.25, 1.0, 3.0, 8.0)
"""Seconds before each of the consecutive reconnections tried (then WireError)."""
WINDOW = 32
"""Default frames in flight per connection."""
FRAME_BYTES = 1024 * 1024
"""Data bytes in flight allowed per frame of the window: a window of N frames holds
at most N MiB (larger chunks make fewer frames; a chunk larger still goes alone)."""
MAX_REQUEST = 16 * 1024 * 1024
"""Largest READ or single DATA frame made from one ``write``/``readinto`` (bytes)."""
SEGMENT = struct.Struct("<IIB")
COUNT = struct.Struct("<I")

Dial = Callable[[], Stream]
"""Opens a new stream to the receiver (tests wrap the real socket). With TLS it
must return a :class:`socket.socket`, which is then wrapped."""

Segments = Sequence[tuple[int, int, bool]]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WireCounts:
    """Traffic of a RemoteDevice and its clones, in bytes (headers included) and events.

    ``frames_resent``/``resent_bytes``: frames sent again, after a NAK, a
    damaged reply or a reconnection (their encoded size).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_resent: int = 0
    reconnects: int = 0
    resent_bytes: int = 0


class _Family:
    """What a device and its clones share: traffic totals and the live members.

    Thread-safe. Connection counters are read while their owner may update
    them (plain integers: a snapshot is a little behind, never torn).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = [0, 0, 0, 0, 0]
        self._live: set[Connection] = set()
        self._members: list[RemoteDevice] = []

    def attach(self, conn: Connection) -> None:
        with self._lock:
            self._live.add(conn)

    def detach(self, conn: Connection) -> None:
        with self._lock:
            self._live.discard(conn)
            self._totals = [a + b for a, b in zip(self._totals, _traffic(conn), strict=True)]

    def reconnected(self) -> None:
        with self._lock:
            self._totals[3] += 1

    def snapshot(self) -> WireCounts:
        with self._lock:
            totals = self._totals
            for conn in self._live:
                totals = [a + b for a, b in zip(totals, _traffic(conn), strict=True)]
        return WireCounts(*totals)

    def join(self, device: RemoteDevice) -> None:
        with self._lock:
            self._members.append(device)

    def leave(self, device: RemoteDevice) -> None:
        with self._lock:
            self._members = [m for m in self._members if m is not device]

    def members(self) -> list[RemoteDevice]:
        with self._lock:
            return list(self._members)


def _traffic(conn: Connection) -> tuple[int, int, int, int, int]:
    return conn.bytes_sent, conn.bytes_received, conn.frames_resent, 0, conn.bytes_resent


@dataclass(frozen=True, slots=True)
class _Params:
    """How every connection of a device (and its clones) is made."""

    hello: Hello
    dial: Dial
    tls: ssl.SSLContext | None
    window: int

    @property
    def peer(self) -> str:
        return self.hello.peer


class RemoteDevice:
    """The receiver's target disk, over one connection. Not thread-safe: clone per thread.

    Every method raises DiskError (WireError, DecryptionFailed, or the
    receiver's own error, rebuilt from its code). An error in reply to a
    write in flight is raised by a later call (the next write, a flush, or
    :meth:`close`), which then forgets the rest of the window.
    """

    def __init__(self, params: _Params, family: _Family) -> None:
        self._params = params
        self._family = family
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._closed = False
        self._window = Window(params.window, params.window * FRAME_BYTES)
        self._stream = os.urandom(16).hex()
        self._failures = 0
        self.welcome = self._first_connection()
        family.join(self)

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        size: int,
        job: str = "",
        key: SecretKey | None = None,
        compress: bool = False,
        ticket: str | None = None,
        tls: ssl.SSLContext | None = None,
        window: int = WINDOW,
        dial: Dial | None = None,
    ) -> RemoteDevice:
        """Connect to the receiver at ``address`` for a source of ``size`` bytes.

        ``job`` names the sync for resumption (the same job resumes from its
        last mark). ``key`` seals every frame (the receiver must hold the
        same key); ``compress`` compresses data frames with zstd. ``ticket``
        selects the transfer at a :class:`~siterecovery.wire.server.WireServer`
        (None for a single-target Receiver). ``tls``: a client context (see
        ``agent.tls.client_context``, pinning the receiver's certificate)
        wrapping every connection. ``window``: frames in flight per
        connection, and ``window`` MiB of data (1 is stop-and-wait).
        """
        where = addresses.parse(address)
        if window < 1:
            raise ValueError(f"window {window} < 1")
        hello = Hello(str(where), size, job, key, compress, ticket)
        params = _Params(hello, dial or (lambda: addresses.dial(where)), tls, window)
        return cls(params, _Family())

    @property
    def size(self) -> int:
        return self.welcome.size

    @property
    def counts(self) -> WireCounts:
        """Traffic so far of this device and its clones (live connections included)."""
        return self._family.snapshot()

    @property
    def in_flight(self) -> tuple[int, int]:
        """Frames sent and not answered yet, and their data bytes (this connection)."""
        return len(self._window), self._window.nbytes

    # BlockDevice.

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._check_range(offset, len(buf))
        for start in range(0, len(buf), MAX_REQUEST):
            piece = buf[start : start + MAX_REQUEST]
            fill = functools.partial(_fill, piece, self._params.peer)
            self._call(Kind.READ, fill, offset=offset + start, length=len(piece))

    def write(self, offset: int, buf: memoryview) -> None:
        """Send ``buf`` (copied: reusable at once); its ACK comes later."""
        for start in range(0, len(buf), MAX_REQUEST):
            piece = buf[start : start + MAX_REQUEST]
            self.write_segments(offset + start, piece, [(0, len(piece), False)])

    def zero(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        self._post(Pending(Kind.ZERO, offset, length))

    def flush(self) -> None:
        """The receiver flushes its target: every write that returned, through any clone."""
        self._call(Kind.FLUSH, _ignore)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        length = self.size - offset if length is None else length
        self._check_range(offset, length)
        found = self._call(Kind.EXTENTS, _json, offset=offset, length=length)
        return iter([Extent(s, n, zero=bool(z)) for s, n, z in found])

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        raise DiskError(detail=f"the receiver at {self._params.peer} has no change tracking")

    def clone(self) -> RemoteDevice:
        """A new connection to the same receiver, counted in the same totals."""
        return RemoteDevice(self._params, self._family)

    def close(self) -> None:
        """Wait for the writes in flight, then hang up. Idempotent.

        Raises the error a write in flight got (the connection is closed anyway).
        """
        with self._lock:
            if self._closed:
                return
            try:
                if self._window:
                    self._run(self._settle)
            finally:
                self._closed = True
                self._window.clear()
                self._drop()
                self._family.leave(self)

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Beyond the block device.

    def write_segments(self, offset: int, view: memoryview, segments: Segments) -> None:
        """One DATA frame: the data segments of ``view`` and its zero segments.

        Returns once the frame is sent (its data copied: ``view`` may be
        reused at once), possibly before it is applied.
        """
        self._check_range(offset, len(view))
        table = COUNT.pack(len(segments)) + b"".join(
            SEGMENT.pack(start, length, zero) for start, length, zero in segments
        )
        size = sum(n for _, n, zero in segments if not zero)

        def frame() -> Pending:  # Built once there is room: the copy waits too.
            data, buf = self._window.copy(view, segments)
            parts = (table,) if data is None else (table, data)
            return Pending(Kind.DATA, offset, len(view), parts, True, size, buf)

        self._post(frame, size=size)

    def block_digests(
        self, block_size: int, *, offset: int, length: int, threads: int
    ) -> tuple[Digests, int]:
        """Digests hashed by the receiver on its own disk, and the bytes it read."""
        self._check_range(offset, length)
        request = json.dumps({"block_size": block_size, "threads": threads}).encode()
        expected = -(-length // block_size)

        def parse(reply: Frame) -> tuple[Digests, int]:
            (hashed,) = struct.unpack_from("<Q", reply.payload)
            digests = np.frombuffer(reply.payload[8:], dtype=np.uint8).reshape(-1, DIGEST_SIZE)
            if len(digests) != expected:
                raise WireError(peer=self._params.peer, detail="DIGEST_LIST of the wrong length")
            return digests.copy(), int(hashed)

        return self._call(Kind.DIGESTS, parse, offset=offset, length=length, parts=(request,))

    def disk_digest(self) -> str:
        """The receiver's whole-disk digest of its target (see ``disk.digest``)."""
        return str(self._call(Kind.DISK_DIGEST, _json)["digest"])

    def mark(self, offset: int) -> None:
        """Remember ``offset`` as this job's checkpoint at the receiver (a Checkpoint callback).

        Every write that returned before, through any clone, is applied first.
        """
        self._call(Kind.MARK, _ignore, offset=offset)

    def done(self) -> None:
        """Tell the receiver the job is complete (it forgets the mark)."""
        self._call(Kind.DONE, _ignore)

    # Requests.

    def _post(self, frame: Pending | Callable[[], Pending], *, size: int = 0) -> None:
        """Send a windowed frame once there is room (``frame()`` builds it then)."""
        with self._lock:
            self._run(lambda conn: self._make_room(conn, size))
            self._window.add(frame if isinstance(frame, Pending) else frame())
            self._run(self._send_unsent)

    def _call(
        self,
        kind: Kind,
        parse: Callable[[Frame], T],
        *,
        offset: int = 0,
        length: int = 0,
        parts: tuple[bytes, ...] = (),
    ) -> T:
        """A request that waits for its answer, after every write in flight of the family.

        ``parse`` reads the answer while the connection's buffer holds it.
        """
        for member in self._family.members():
            if member is not self:
                member._settle_now()
        with self._lock:
            self._run(self._settle)
            query = Pending(kind, offset, length, parts)
            self._window.add(query)
            return self._run(lambda conn: parse(self._await(conn, query)))

    def _settle_now(self) -> None:
        """Wait for this device's writes in flight (from another member's thread)."""
        with self._lock:
            if not self._closed and self._window:
                self._run(self._settle)

    def _run(self, step: Callable[[Connection], T]) -> T:
        """``step`` on the live connection; when it breaks, reconnect and run it again."""
        while True:
            conn = self._connection()
            try:
                return step(conn)
            except (Closed, CorruptHeader) as e:
                self._broken(e)

    def _make_room(self, conn: Connection, size: int) -> None:
        while self._window and conn.poll():
            self._collect(conn)  # Answers already here: retire them first.
        while self._window.full(size):
            self._collect(conn)

    def _settle(self, conn: Connection) -> None:
        while self._window:
            self._collect(conn)

    def _await(self, conn: Connection, query: Pending) -> Frame:
        self._send_unsent(conn)
        while True:
            reply = self._collect(conn)
            if query.answered and reply is not None:
                return reply

    def _send_unsent(self, conn: Connection, *, resent: bool = False) -> None:
        for p in self._window.unsent():
            p.seq = conn.send(p.kind, offset=p.offset, length=p.length, parts=p.parts,
                              compress=p.compress, resent=resent).seq  # fmt: skip

    def _collect(self, conn: Connection) -> Frame | None:
        """Read one reply and act on it; the reply when it answered something."""
        try:
            reply = conn.recv()
        except CorruptPayload:
            self._go_back(conn)  # A damaged reply: ask again from the oldest.
            return None
        kind, answered = reply.kind, reply.offset
        if kind in (Kind.ACK, Kind.NAK, Kind.ERROR) and answered and self._window.stale(answered):
            return None  # Answers a frame sent again after it was applied.
        if kind is Kind.ERROR:  # The connection stays usable: later answers are stale.
            self._fail(remote_error(reply.payload, self._params.peer), hang_up=False)
        if kind is Kind.NAK:
            self._window.retire_through(answered - 1)
            self._go_back(conn)
            return None
        oldest = self._window.oldest
        if kind is Kind.ACK:
            if not self._window.retire_through(answered):
                return None
        elif oldest is not None and not oldest.windowed:
            self._window.retire_oldest()  # The answer to the one query in flight.
        else:
            self._fail(WireError(peer=self._params.peer, detail=f"unexpected {kind.name}"))
        self._failures = 0
        return reply

    def _go_back(self, conn: Connection) -> None:
        """Send again every unanswered frame, oldest first, under the same numbers."""
        oldest = self._window.oldest
        if oldest is None:
            return
        oldest.tries += 1
        if oldest.tries >= ATTEMPTS:
            detail = f"frame {oldest.seq} ({oldest.kind.name}) kept arriving damaged"
            self._fail(WireError(peer=self._params.peer, detail=detail))
        for p in self._window:
            conn.send(p.kind, offset=p.offset, length=p.length, parts=p.parts,
                      compress=p.compress, seq=p.seq)  # fmt: skip

    def _fail(self, error: SiteRecoveryError, *, hang_up: bool = True) -> NoReturn:
        """Give up on what is in flight: forget the window, hang up, raise ``error``."""
        self._window.clear()
        if hang_up:
            self._drop()
        raise error

    # Connections.

    def _connection(self) -> Connection:
        if self._closed:
            raise DiskError(detail=f"the connection to {self._params.peer} is closed")
        while self._conn is None:
            try:
                self._reconnect()
            except (Closed, CorruptHeader) as e:
                self._broken(e)
            except SiteRecoveryError as e:  # Refused (ticket withdrawn, key changed...).
                self._fail(e)
        return self._conn

    def _broken(self, error: Exception) -> None:
        """The connection broke: drop it, wait before the next try, or give up."""
        self._drop()
        self._failures += 1
        if self._failures > len(BACKOFF):
            self._failures = 0
            detail = f"gave up after {len(BACKOFF)} reconnections: {error}"
            self._fail(WireError(peer=self._params.peer, detail=detail))
        time.sleep(BACKOFF[self._failures - 1])

    def _reconnect(self) -> None:
        """A new connection, and every unanswered frame sent on it again."""
        conn, welcome = self._open()
        self._family.reconnected()
        self._conn, self.welcome = conn, welcome
        self._window.renumber()
        self._send_unsent(conn, resent=True)

    def _first_connection(self) -> Welcome:
        try:
            conn, welcome = self._open()
        except (Closed, CorruptHeader) as e:
            if isinstance(e.__cause__, WireError):
                raise e.__cause__ from None  # Could not connect at all.
            raise WireError(peer=self._params.peer, detail=f"handshake failed: {e}") from None
        self._conn = conn
        return welcome

    def _open(self) -> tuple[Connection, Welcome]:
        """Dial, wrap in TLS, say HELLO. Raises Closed when worth trying again."""
        conn = Connection(self._dial(), self._params.peer)
        self._family.attach(conn)
        try:
            return conn, handshake(conn, self._params.hello, self._stream)
        except BaseException:
            self._family.detach(conn)
            conn.close()
            raise

    def _dial(self) -> Stream:
        params = self._params
        try:
            stream = params.dial()
        except WireError as e:  # Refused or unreachable: maybe not for long.
            raise Closed(str(e)) from e
        if params.tls is None:
            return stream
        if not isinstance(stream, socket.socket):
            raise WireError(peer=params.peer, detail="TLS needs the dialled stream to be a socket")
        return wrap(params.tls, stream, params.peer)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._family.detach(conn)
            conn.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(
                detail=f"range {offset}+{length} is outside the target at "
                f"{self._params.peer} (size {self.size})"
            )


def _fill(piece: memoryview, peer: str, reply: Frame) -> None:
    if len(reply.payload) != len(piece):
        raise WireError(peer=peer, detail="short READ reply")
    piece[:] = reply.payload


def _json(reply: Frame) -> Any:
    return json.loads(bytes(reply.payload))


def _ignore(reply: Frame) -> None:
    return None
