"""The receiving side: apply what senders stream to one target disk.

A :class:`Receiver` serves one target to any number of connections (one
thread each, each with its own clone of the target). The target is opened
on the first HELLO, when the source's size is known, so a missing image can
be created at the right size. Checkpoints marked by a sender are kept per
job for the receiver's lifetime: a sender that died reconnects and resumes
from there.

Damaged frames are answered with NAK (payload) or by hanging up (header);
a repeated ``seq`` gets the last reply again, without applying anything
twice. Errors of the target travel back as ERROR frames carrying the error
document (code, message, details).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.digest import block_digests, disk_digest
from siterecovery.domain.errors import (
    DecryptionFailed,
    DiskError,
    SiteRecoveryError,
    WireError,
    describe,
)
from siterecovery.keys import SecretKey
from siterecovery.wire.client import COUNT, SEGMENT, VERSION
from siterecovery.wire.frames import (
    Closed,
    Connection,
    CorruptHeader,
    CorruptPayload,
    Frame,
    Kind,
    Sent,
    Stream,
    derive_keys,
    key_proof,
)

OpenTarget = Callable[[int], tuple[BlockDevice, bool]]
"""``open_target(size)``: the target, writable, of at least ``size`` bytes, and
whether it was created just now (then it reads as zeroes)."""

_ACCEPT_POLL = 0.1


@dataclass(frozen=True, slots=True)
class ReceiverCounts:
    """What a receiver did so far (bytes and events)."""

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


class Receiver:
    """Serves one target disk to senders. Thread-safe.

    ``once``: :meth:`serve` returns after the first job is done (a sender
    sent DONE) and its connections closed. DIGESTS requests hash the target
    with as many threads as the sender asks for.
    """

    def __init__(
        self, open_target: OpenTarget, *, key: SecretKey | None = None, once: bool = False
    ) -> None:
        self._open_target = open_target
        self._key = key
        self._once = once
        self._lock = threading.Lock()
        self._target: BlockDevice | None = None
        self._created = False
        self._marks: dict[str, int] = {}
        self._totals = _Totals()
        self._active = 0
        self._finished = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[Any] = set()

    @property
    def counts(self) -> ReceiverCounts:
        with self._lock:
            return ReceiverCounts(**self._totals.counts)

    @property
    def target(self) -> BlockDevice | None:
        """The target, once a sender said hello."""
        return self._target

    def serve(self, listener: socket.socket) -> None:
        """Accept connections until :meth:`stop` (or, with ``once``, a finished job).

        Joins every session before returning; does not close ``listener``.
        """
        listener.settimeout(_ACCEPT_POLL)
        while not self._stop.is_set() and not self._done():
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(None)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets.add(sock)
            self._start(sock, _peer_name(peer))
        for thread in self._threads:
            thread.join()

    def _done(self) -> bool:
        with self._lock:
            return self._once and self._finished.is_set() and self._active == 0

    def _start(self, stream: Stream, peer: str) -> None:
        with self._lock:
            self._active += 1
        thread = threading.Thread(target=self.handle, args=(stream, peer), name=f"recv-{peer}")
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def handle(self, stream: Stream, peer: str) -> None:
        """Serve one connection until it closes (from the calling thread)."""
        conn = Connection(stream, peer)
        try:
            _Session(self, conn).run()
        finally:
            conn.close()
            with self._lock:
                self._sockets.discard(stream)
                self._active -= 1
                self._totals.add(bytes_received=conn.bytes_received, bytes_sent=conn.bytes_sent)

    def stop(self) -> None:
        """Make :meth:`serve` return soon: hang up on every sender. Signal-safe."""
        self._stop.set()
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the target. Call after :meth:`serve` returned."""
        target, self._target = self._target, None
        if target is not None:
            target.close()

    # For sessions.

    def welcome(self, hello: dict[str, Any], peer: str) -> tuple[BlockDevice, dict[str, Any]]:
        """Check a HELLO; the session's clone of the target and the WELCOME document."""
        if hello.get("version") != VERSION:
            version = hello.get("version")
            raise WireError(peer=peer, detail=f"protocol version {version} != {VERSION}")
        self._check_key(hello.get("key"), peer)
        size = int(hello["size"])
        with self._lock:
            if self._target is None:
                self._target, self._created = self._open_target(size)
            target, created = self._target, self._created
            resume = self._marks.get(str(hello.get("job", "")), 0)
            self._totals.add(sessions=1)
        if target.size < size:
            raise DiskError(
                detail=f"the target ({target.size} bytes) is smaller than the source ({size} bytes)"
            )
        doc = {"size": target.size, "created": created, "resume": resume}
        return target.clone(), doc

    def _check_key(self, fingerprint: str | None, peer: str) -> None:
        ours = self._key.fingerprint if self._key else None
        if fingerprint == ours:
            return
        if ours is None:
            reason = "the sender encrypts but the receiver has no key (start it with --key)"
        elif fingerprint is None:
            reason = f"the receiver requires encryption with key '{self._key.name}'"  # type: ignore[union-attr]
        else:
            reason = f"key fingerprints differ: sender {fingerprint}, receiver {ours}"
        raise DecryptionFailed(peer=peer, reason=reason)

    @property
    def key(self) -> SecretKey | None:
        return self._key

    def mark(self, job: str, offset: int) -> None:
        with self._lock:
            self._marks[job] = offset

    def finish(self, job: str) -> None:
        with self._lock:
            self._marks.pop(job, None)
            self._totals.add(jobs_done=1)
        self._finished.set()

    def count(self, **values: int) -> None:
        with self._lock:
            self._totals.add(**values)


class _Session:
    """One connection: handshake, then requests until the sender hangs up."""

    def __init__(self, receiver: Receiver, conn: Connection) -> None:
        self._receiver = receiver
        self._conn = conn
        self._dev: BlockDevice | None = None
        self._job = ""
        self._last_seq = 0
        self._last_reply: Sent | None = None

    def run(self) -> None:
        try:
            if self._hello():
                self._serve()
        finally:
            if self._dev is not None:
                self._dev.close()

    def _hello(self) -> bool:
        try:
            frame = self._conn.recv()
            if frame.kind is not Kind.HELLO:
                raise WireError(peer=self._conn.peer, detail="expected HELLO")
            hello = json.loads(bytes(frame.payload))
            self._dev, doc = self._receiver.welcome(hello, self._conn.peer)
        except (Closed, CorruptHeader, CorruptPayload, ValueError):
            return False
        except SiteRecoveryError as e:
            self._reply_error(e)
            return False
        self._job = str(hello.get("job", ""))
        self._last_seq = frame.seq
        self._send_welcome(doc, bytes.fromhex(hello["random"]))
        return True

    def _send_welcome(self, doc: dict[str, Any], client_random: bytes) -> None:
        key = self._receiver.key
        server_random = os.urandom(16)
        doc["random"] = server_random.hex()
        if key is not None:
            keys = derive_keys(key.material, client_random, server_random)
            doc["proof"] = key_proof(keys.to_client, server_random).hex()
        self._conn.send(Kind.WELCOME, parts=[json.dumps(doc).encode()])
        if key is not None:
            self._conn.configure(send_key=keys.to_client, recv_key=keys.to_server, compress=False)

    def _serve(self) -> None:
        while True:
            try:
                frame = self._conn.recv()
            except CorruptPayload as e:
                self._receiver.count(corrupt_frames=1)
                self._conn.send(Kind.NAK, offset=e.seq)
                continue
            except (Closed, CorruptHeader):
                return  # A damaged header loses the framing: hang up, the sender retries.
            except DecryptionFailed as e:
                self._reply_error(e)
                return
            if not self._answer(frame):
                return

    def _answer(self, frame: Frame) -> bool:
        """Apply ``frame`` once and reply; False ends the session."""
        if frame.seq == self._last_seq and self._last_reply is not None:
            self._conn.resend(self._last_reply)  # Our reply was lost or damaged.
            return True
        if frame.seq != self._last_seq + 1:
            detail = f"frame {frame.seq} out of order"
            self._reply_error(WireError(peer=self._conn.peer, detail=detail))
            return False
        self._receiver.count(frames=1)
        try:
            self._last_reply = self._apply(frame)
        except SiteRecoveryError as e:
            self._last_reply = self._reply_error(e)
        except Exception as e:
            self._reply_error(e)
            return False
        self._last_seq = frame.seq
        return True

    def _apply(self, frame: Frame) -> Sent:
        dev = self._dev
        assert dev is not None
        kind, offset, length = frame.kind, frame.offset, frame.length
        if kind is Kind.DATA:
            self._write(dev, frame)
        elif kind is Kind.ZERO:
            dev.zero(offset, length)
            self._receiver.count(bytes_zeroed=length)
        elif kind is Kind.FLUSH:
            dev.flush()
        elif kind is Kind.MARK:
            self._receiver.mark(self._job, offset)
        elif kind is Kind.DONE:
            self._receiver.finish(self._job)
        else:
            return self._query(dev, frame)
        return self._conn.send(Kind.ACK, offset=frame.seq)

    def _query(self, dev: BlockDevice, frame: Frame) -> Sent:
        kind, offset, length = frame.kind, frame.offset, frame.length
        if kind is Kind.DIGESTS:
            return self._digests(dev, frame)
        if kind is Kind.DISK_DIGEST:
            doc = {"digest": disk_digest(dev)}
            return self._conn.send(Kind.REPLY, parts=[json.dumps(doc).encode()])
        if kind is Kind.EXTENTS:
            found = [[e.start, e.length, e.zero] for e in dev.extents(offset, length)]
            return self._conn.send(Kind.REPLY, parts=[json.dumps(found).encode()])
        if kind is Kind.READ:
            buf = memoryview(bytearray(length))
            dev.readinto(offset, buf)
            return self._conn.send(Kind.DATA, offset=offset, length=length, parts=[buf])
        raise WireError(peer=self._conn.peer, detail=f"unexpected {kind.name} frame")

    def _write(self, dev: BlockDevice, frame: Frame) -> None:
        """Apply a verified DATA frame: its data segments, then its zero segments.

        The ACK goes out after the writes returned (a write error is this
        frame's ERROR), so an acknowledged chunk is on the target.
        """
        table = _table(frame, self._conn.peer)
        payload, pos = frame.payload, COUNT.size + len(table) * SEGMENT.size
        written = zeroed = 0
        for start, length, zero in table:
            if zero:
                dev.zero(frame.offset + start, length)
                zeroed += length
            else:
                dev.write(frame.offset + start, payload[pos : pos + length])
                pos, written = pos + length, written + length
        self._receiver.count(bytes_written=written, bytes_zeroed=zeroed)

    def _digests(self, dev: BlockDevice, frame: Frame) -> Sent:
        request = json.loads(bytes(frame.payload))
        hashed = [0]
        lock = threading.Lock()

        def on_read(nbytes: int) -> None:
            with lock:
                hashed[0] += nbytes

        digests = block_digests(
            dev,
            int(request["block_size"]),
            offset=frame.offset,
            length=frame.length,
            threads=max(1, int(request.get("threads", 2))),
            on_read=on_read,
        )
        parts = [struct.pack("<Q", hashed[0]), digests.tobytes()]
        return self._conn.send(Kind.DIGEST_LIST, offset=frame.offset, parts=parts)

    def _reply_error(self, error: BaseException) -> Sent | None:
        try:
            return self._conn.send(Kind.ERROR, parts=[json.dumps(describe(error)).encode()])
        except Closed:
            return None


def _table(frame: Frame, peer: str) -> list[tuple[int, int, bool]]:
    """The segment table of a DATA frame, checked against its chunk and payload."""
    payload = frame.payload
    (count,) = COUNT.unpack_from(payload)
    pos = COUNT.size + count * SEGMENT.size
    table = [(s, n, bool(z)) for s, n, z in SEGMENT.iter_unpack(payload[COUNT.size : pos])]
    data = sum(n for _, n, zero in table if not zero)
    if any(s + n > frame.length for s, n, _ in table) or pos + data != len(payload):
        raise WireError(peer=peer, detail=f"DATA frame {frame.seq} does not match its table")
    return table


def _peer_name(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) or "unix"
