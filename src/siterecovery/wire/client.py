"""The sending side: a :class:`~siterecovery.disk.base.BlockDevice` at the other end of the wire.

:class:`RemoteDevice` is the target of a sync whose disk lives with a
receiver. Besides the block-device methods it takes whole chunks in one
frame (:meth:`RemoteDevice.write_segments`), hashes blocks where the disk
lives (:meth:`RemoteDevice.block_digests`: only digests travel), and
remembers checkpoints at the receiver (:meth:`RemoteDevice.mark`), so a
later sender resumes from :attr:`Welcome.resume_offset`.

Each request waits for its reply before the next one (the engine runs one
connection per writer, so replies overlap across writers). A NAK or a
corrupt reply resends the same frame; a lost connection (or a corrupt
header, after which the receiver hangs up) reconnects and sends the request
again: every request is idempotent. After :data:`ATTEMPTS` tries the
request fails with WireError.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from siterecovery.disk.base import Extent
from siterecovery.disk.digest import DIGEST_SIZE, Digests
from siterecovery.domain.errors import (
    DiskError,
    SiteRecoveryError,
    WireError,
    all_error_classes,
)
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
    check_proof,
    derive_keys,
)

VERSION = 1
ATTEMPTS = 4
"""Tries of one request (resends and reconnects) before giving up."""
MAX_REQUEST = 16 * 1024 * 1024
"""Largest READ or single DATA frame made from one ``write``/``readinto`` (bytes)."""
SEGMENT = struct.Struct("<IIB")
COUNT = struct.Struct("<I")

Dial = Callable[[], Stream]
"""Opens a new stream to the receiver (tests wrap the real socket)."""

Segments = Sequence[tuple[int, int, bool]]


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
class WireCounts:
    """Traffic of a RemoteDevice and its clones, in bytes (headers included) and events."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_resent: int = 0
    reconnects: int = 0


class _Counters:
    """Thread-safe totals over every connection of a device and its clones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = {"sent": 0, "received": 0, "resent": 0, "reconnects": 0}

    def add(self, conn: Connection, *, reconnects: int = 0) -> None:
        with self._lock:
            self._totals["sent"] += conn.bytes_sent
            self._totals["received"] += conn.bytes_received
            self._totals["resent"] += conn.frames_resent
            self._totals["reconnects"] += reconnects

    def snapshot(self) -> WireCounts:
        with self._lock:
            t = self._totals
            return WireCounts(t["sent"], t["received"], t["resent"], t["reconnects"])


@dataclass(frozen=True, slots=True)
class _Params:
    """What every connection of a device (and its clones) says in its HELLO."""

    peer: str
    dial: Dial
    size: int
    job: str
    key: SecretKey | None
    compress: bool


class RemoteDevice:
    """The receiver's target disk, over one connection. Not thread-safe: clone per thread.

    Every method raises DiskError (WireError, DecryptionFailed, or the
    receiver's own error, rebuilt from its code).
    """

    def __init__(self, params: _Params, counters: _Counters) -> None:
        self._params = params
        self._counters = counters
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._closed = False
        self._reconnects = 0
        self.welcome = self._connect()

    @classmethod
    def connect(
        cls,
        address: str,
        *,
        size: int,
        job: str = "",
        key: SecretKey | None = None,
        compress: bool = False,
        dial: Dial | None = None,
    ) -> RemoteDevice:
        """Connect to the receiver at ``address`` for a source of ``size`` bytes.

        ``job`` names the sync for resumption (the same job resumes from its
        last mark). ``key`` seals every frame (the receiver must hold the
        same key); ``compress`` compresses data frames with zstd.
        """
        where = addresses.parse(address)
        params = _Params(
            peer=str(where),
            dial=dial or (lambda: addresses.dial(where)),
            size=size,
            job=job,
            key=key,
            compress=compress,
        )
        return cls(params, _Counters())

    @property
    def size(self) -> int:
        return self.welcome.size

    @property
    def counts(self) -> WireCounts:
        """Traffic so far of this device and its clones (live connection: this one only)."""
        total, conn = self._counters.snapshot(), self._conn
        if conn is None:
            return total
        return WireCounts(
            total.bytes_sent + conn.bytes_sent,
            total.bytes_received + conn.bytes_received,
            total.frames_resent + conn.frames_resent,
            total.reconnects + self._reconnects,
        )

    # BlockDevice.

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._check_range(offset, len(buf))
        for start in range(0, len(buf), MAX_REQUEST):
            piece = buf[start : start + MAX_REQUEST]
            reply = self._call(Kind.READ, offset=offset + start, length=len(piece))
            if len(reply.payload) != len(piece):
                raise WireError(peer=self._params.peer, detail="short READ reply")
            piece[:] = reply.payload

    def write(self, offset: int, buf: memoryview) -> None:
        for start in range(0, len(buf), MAX_REQUEST):
            piece = buf[start : start + MAX_REQUEST]
            self.write_segments(offset + start, piece, [(0, len(piece), False)])

    def zero(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        self._call(Kind.ZERO, offset=offset, length=length)

    def flush(self) -> None:
        """The receiver flushes its target (every connection's completed writes)."""
        self._call(Kind.FLUSH)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        length = self.size - offset if length is None else length
        self._check_range(offset, length)
        reply = self._call(Kind.EXTENTS, offset=offset, length=length)
        found = [Extent(s, n, zero=bool(z)) for s, n, z in json.loads(bytes(reply.payload))]
        return iter(found)

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        raise DiskError(detail=f"the receiver at {self._params.peer} has no change tracking")

    def clone(self) -> RemoteDevice:
        """A new connection to the same receiver, counted in the same totals."""
        return RemoteDevice(self._params, self._counters)

    def close(self) -> None:
        """Hang up. Idempotent."""
        with self._lock:
            self._closed = True
            self._drop()

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Beyond the block device.

    def write_segments(self, offset: int, view: memoryview, segments: Segments) -> None:
        """One DATA frame: the data segments of ``view`` and its zero segments."""
        self._check_range(offset, len(view))
        table = COUNT.pack(len(segments)) + b"".join(
            SEGMENT.pack(start, length, zero) for start, length, zero in segments
        )
        data = [view[s : s + n] for s, n, zero in segments if not zero]
        self._call(Kind.DATA, offset=offset, length=len(view), parts=[table, *data], compress=True)

    def block_digests(
        self, block_size: int, *, offset: int, length: int, threads: int
    ) -> tuple[Digests, int]:
        """Digests hashed by the receiver on its own disk, and the bytes it read."""
        self._check_range(offset, length)
        request = json.dumps({"block_size": block_size, "threads": threads}).encode()
        reply = self._call(Kind.DIGESTS, offset=offset, length=length, parts=[request])
        (hashed,) = struct.unpack_from("<Q", reply.payload)
        digests = np.frombuffer(reply.payload[8:], dtype=np.uint8).reshape(-1, DIGEST_SIZE)
        if len(digests) != -(-length // block_size):
            raise WireError(peer=self._params.peer, detail="DIGEST_LIST of the wrong length")
        return digests.copy(), int(hashed)

    def disk_digest(self) -> str:
        """The receiver's whole-disk digest of its target (see ``disk.digest``)."""
        reply = self._call(Kind.DISK_DIGEST)
        return str(json.loads(bytes(reply.payload))["digest"])

    def mark(self, offset: int) -> None:
        """Remember ``offset`` as this job's checkpoint at the receiver (a Checkpoint callback)."""
        self._call(Kind.MARK, offset=offset)

    def done(self) -> None:
        """Tell the receiver the job is complete (it forgets the mark)."""
        self._call(Kind.DONE)

    # Requests.

    def _call(
        self,
        kind: Kind,
        *,
        offset: int = 0,
        length: int = 0,
        parts: Sequence[bytes | memoryview] = (),
        compress: bool = False,
    ) -> Frame:
        with self._lock:
            failure: Exception | None = None
            for _ in range(ATTEMPTS):
                conn = self._connection()
                try:
                    return self._exchange(conn, kind, offset, length, parts, compress)
                except (Closed, CorruptHeader) as e:
                    failure = e
                    self._drop()
            raise WireError(peer=self._params.peer, detail=f"gave up on {kind.name}: {failure}")

    def _exchange(
        self,
        conn: Connection,
        kind: Kind,
        offset: int,
        length: int,
        parts: Sequence[bytes | memoryview],
        compress: bool,
    ) -> Frame:
        sent = conn.send(kind, offset=offset, length=length, parts=parts, compress=compress)
        for _ in range(ATTEMPTS):
            try:
                reply = conn.recv()
            except CorruptPayload:
                conn.resend(sent)  # Their reply was damaged: ask again.
                continue
            if reply.kind is Kind.NAK:
                conn.resend(sent)  # Our frame was damaged: send it again.
                continue
            if reply.kind is Kind.ERROR:
                raise remote_error(reply.payload, self._params.peer)
            return reply
        raise WireError(peer=self._params.peer, detail=f"frame {sent.seq} kept arriving damaged")

    def _connection(self) -> Connection:
        if self._closed:
            raise DiskError(detail=f"the connection to {self._params.peer} is closed")
        if self._conn is None:
            self.welcome = self._connect(reconnect=True)
        assert self._conn is not None
        return self._conn

    def _connect(self, *, reconnect: bool = False) -> Welcome:
        conn = Connection(self._params.dial(), self._params.peer)
        try:
            welcome = _handshake(conn, self._params)
        except BaseException:
            self._counters.add(conn)
            conn.close()
            raise
        self._reconnects += int(reconnect)
        self._conn = conn
        return welcome

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._counters.add(conn, reconnects=self._reconnects)
            self._reconnects = 0
            conn.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DiskError(
                detail=f"range {offset}+{length} is outside the target at "
                f"{self._params.peer} (size {self.size})"
            )


def _handshake(conn: Connection, params: _Params) -> Welcome:
    """HELLO → WELCOME; then every later frame is sealed (with a key) and maybe compressed."""
    client_random = os.urandom(16)
    hello = {
        "version": VERSION,
        "size": params.size,
        "job": params.job,
        "key": params.key.fingerprint if params.key else None,
        "random": client_random.hex(),
    }
    try:
        conn.send(Kind.HELLO, parts=[json.dumps(hello).encode()])
        reply = conn.recv()
    except (Closed, CorruptHeader, CorruptPayload) as e:
        raise WireError(peer=params.peer, detail=f"handshake failed: {e}") from None
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
    for cls in all_error_classes():
        if cls.code == code:
            error = Exception.__new__(cls)
            Exception.__init__(error, message)
            error.fields = dict(doc.get("details") or {})
            return error
    return WireError(peer=peer, detail=f"{code}: {message}")
