"""One connection at the receiving side: handshake, then frames in order until it ends.

A :class:`Session` applies frames strictly in ``seq`` order (see the rules in
:mod:`siterecovery.wire`): the next expected one is applied and answered; a
repeated one gets its answer again without being applied twice; a damaged
one is answered with NAK, and every frame after it is discarded unanswered
until it comes again (go-back-N). Errors of the target travel back as ERROR
frames carrying the error document (code, message, details) and the ``seq``
they answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from typing import TYPE_CHECKING, Any

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.digest import block_digests, disk_digest
from siterecovery.domain.errors import DecryptionFailed, SiteRecoveryError, WireError, describe
from siterecovery.wire.client import COUNT, SEGMENT
from siterecovery.wire.frames import (
    Closed,
    Connection,
    CorruptHeader,
    CorruptPayload,
    Frame,
    Kind,
    Sent,
    derive_keys,
    key_proof,
)
from siterecovery.wire.handshake import VERSION

if TYPE_CHECKING:
    from siterecovery.wire.server import WireServer, _Transfer


class Session:
    """One sender's connection. Runs in its own thread (:meth:`run`)."""

    def __init__(self, server: WireServer, conn: Connection) -> None:
        self._server = server
        self._conn = conn
        self.transfer: _Transfer | None = None
        self.stream = ""
        """The sender's connection lineage (HELLO ``stream``): one session of it at a time."""
        self.ended = threading.Event()
        self._dev: BlockDevice | None = None
        self._job = ""
        self._expected = 0
        self._discarding = False
        self._last_reply: Sent | None = None

    def run(self) -> None:
        try:
            if self._hello():
                self._serve()
        except Closed:
            pass  # The sender went away while we answered.
        finally:
            if self._dev is not None:
                self._dev.close()
            if self.transfer is not None:
                self.transfer.left(self, self._conn)
            self.ended.set()
            self._server.left(self)

    def hang_up(self) -> None:
        """Make :meth:`run` return soon (from another thread)."""
        with contextlib.suppress(OSError, AttributeError):
            self._conn.stream.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]

    # The handshake.

    def _hello(self) -> bool:
        try:
            frame = self._conn.recv()
            if frame.kind is not Kind.HELLO:
                raise WireError(peer=self._conn.peer, detail="expected HELLO")
            hello = json.loads(bytes(frame.payload))
            if (version := hello.get("version")) != VERSION:
                detail = f"protocol version {version} != {VERSION}"
                raise WireError(peer=self._conn.peer, detail=detail)
            client_random = bytes.fromhex(hello["random"])
            self.transfer = self._server.find(hello.get("ticket"), self._conn.peer)
            self._dev, doc = self.transfer.welcome(hello, self._conn.peer)
        except (Closed, CorruptHeader, CorruptPayload, ValueError, KeyError, TypeError,
                AttributeError):  # fmt: skip
            return False
        except SiteRecoveryError as e:
            self._reply_error(e)
            return False
        self._job = str(hello.get("job", ""))
        self.stream = str(hello.get("stream") or "")
        self._server.fence(self)  # The same sender's earlier connection ends first.
        self._expected = frame.seq + 1
        self._send_welcome(doc, client_random)
        return True

    def _send_welcome(self, doc: dict[str, Any], client_random: bytes) -> None:
        assert self.transfer is not None
        key = self.transfer.key
        server_random = os.urandom(16)
        doc["random"] = server_random.hex()
        send_key = recv_key = None
        if key is not None:
            keys = derive_keys(key.material, client_random, server_random)
            doc["proof"] = key_proof(keys.to_client, server_random).hex()
            send_key, recv_key = keys.to_client, keys.to_server
        self._conn.send(Kind.WELCOME, parts=[json.dumps(doc).encode()])
        if key is not None or self.transfer.compress:
            self._conn.configure(
                send_key=send_key, recv_key=recv_key, compress=self.transfer.compress
            )

    # Frames in order.

    def _serve(self) -> None:
        while True:
            try:
                frame = self._conn.recv()
            except CorruptPayload as e:
                if not self._damaged(e.seq):
                    return
                continue
            except (Closed, CorruptHeader):
                return  # A damaged header loses the framing: hang up, the sender retries.
            except DecryptionFailed as e:
                self._reply_error(e)
                return
            if not self._answer(frame):
                return

    def _damaged(self, seq: int) -> bool:
        """A frame whose payload failed its check (its header is sound); False ends."""
        self._count(corrupt_frames=1)
        if seq < self._expected:
            self._repeat(seq)  # Applied already: answered as a repeat.
        elif seq == self._expected:
            self._conn.send(Kind.NAK, offset=seq)
            self._discarding = True
        elif not self._discarding:
            return self._out_of_order(seq)
        return True

    def _answer(self, frame: Frame) -> bool:
        """Apply ``frame`` once and reply; False ends the session."""
        seq = frame.seq
        if seq < self._expected:
            self._repeat(seq)
            return True
        if seq > self._expected:
            return self._discarding or self._out_of_order(seq)  # Discarded: it comes again.
        self._discarding = False
        self._count(frames=1)
        try:
            self._last_reply = self._apply(frame)
        except SiteRecoveryError as e:
            self._last_reply = self._reply_error(e, seq)
        except Exception as e:
            self._reply_error(e, seq)
            return False
        self._expected = seq + 1
        return True

    def _repeat(self, seq: int) -> None:
        """Answer a frame applied before again, without applying it."""
        if seq == self._expected - 1 and self._last_reply is not None:
            self._conn.resend(self._last_reply)  # Our reply was lost or damaged.
        else:
            self._conn.send(Kind.ACK, offset=seq)  # Only writes are in flight behind the last.

    def _out_of_order(self, seq: int) -> bool:
        detail = f"frame {seq} out of order (expected {self._expected})"
        self._reply_error(WireError(peer=self._conn.peer, detail=detail))
        return False

    def _apply(self, frame: Frame) -> Sent:
        dev = self._dev
        assert dev is not None and self.transfer is not None
        kind, offset, length = frame.kind, frame.offset, frame.length
        if kind is Kind.DATA:
            self._write(dev, frame)
        elif kind is Kind.ZERO:
            dev.zero(offset, length)
            self._count(bytes_zeroed=length)
        elif kind is Kind.FLUSH:
            dev.flush()
        elif kind is Kind.MARK:
            self.transfer.mark(self._job, offset)
        elif kind is Kind.DONE:
            self.transfer.finish(self._job)
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
            return self._conn.send(
                Kind.DATA, offset=offset, length=length, parts=[buf], compress=True
            )
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
        self._count(bytes_written=written, bytes_zeroed=zeroed)

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

    def _count(self, **values: int) -> None:
        if self.transfer is not None:
            self.transfer.count(**values)

    def _reply_error(self, error: BaseException, seq: int = 0) -> Sent | None:
        """ERROR answering ``seq`` (0: the session), or None when the sender is gone."""
        doc = json.dumps(describe(error)).encode()
        try:
            return self._conn.send(Kind.ERROR, offset=seq, parts=[doc])
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
