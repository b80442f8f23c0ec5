"""Frames on a stream: the header, checksums, compression, sealing.

A :class:`Connection` sends and receives whole frames (layout in
:mod:`siterecovery.wire`) over one stream socket, plain or TLS. It is not
thread-safe: one thread uses it at a time. Payload buffers are sent without
copying when no stage transforms them: ``sendmsg`` with the header and the
caller's buffers on a plain socket; on a TLS socket (which has no
``sendmsg``) the header and small parts are joined into one record and large
parts go out by ``sendall`` of the caller's views. Received payloads land in
one reused buffer per connection.
"""

from __future__ import annotations

import contextlib
import enum
import select
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import xxhash

from siterecovery.domain.errors import DecryptionFailed, WireError

if TYPE_CHECKING:  # cryptography and zstandard load when a key or compression is used.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"SRW1"
HEADER = struct.Struct("<4sBBHQQQIIQ")
"""magic, kind, flags, zero, seq, offset, length, size, hcheck, pcheck (48 bytes)."""
_CHECKED = 36
"""Bytes of the header covered by ``hcheck`` (and sealed as associated data)."""
MAX_PAYLOAD = 64 * 1024 * 1024 + 4096
"""Largest payload a receiver accepts (bytes): a 64 MiB chunk and its table."""
TAG = 16

COMPRESSED = 1
SEALED = 2


class Kind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    DATA = 3
    ZERO = 4
    FLUSH = 5
    MARK = 6
    DIGESTS = 7
    DIGEST_LIST = 8
    DISK_DIGEST = 9
    EXTENTS = 10
    READ = 11
    DONE = 12
    ACK = 13
    NAK = 14
    ERROR = 15
    REPLY = 16


_JOIN = 64 * 1024
"""Without ``sendmsg``, parts up to this size are joined with the header (one TLS record)."""


class Stream(Protocol):
    """What a connection needs of a socket (a real one, a TLS one, or a test double).

    A stream that also has a working ``sendmsg`` (a plain socket) gets
    scatter/gather writes; ``fileno`` is polled by :meth:`Connection.poll`.
    """

    def sendall(self, data: bytes | memoryview, /) -> None: ...

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class _Gather(Protocol):
    def sendmsg(self, buffers: Sequence[bytes | memoryview], /) -> int: ...


@dataclass(frozen=True, slots=True)
class Frame:
    """A received frame; ``payload`` is decoded (valid until the next receive)."""

    kind: Kind
    seq: int
    offset: int
    length: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Sent:
    """An encoded frame, kept by its sender until answered (to resend it)."""

    seq: int
    parts: tuple[bytes | memoryview, ...]

    @property
    def size(self) -> int:
        return sum(len(part) for part in self.parts)


class CorruptPayload(Exception):
    """A frame's payload failed its checksum; the framing is intact (answer NAK)."""

    def __init__(self, seq: int) -> None:
        super().__init__(f"frame {seq}: payload checksum mismatch")
        self.seq = seq


class CorruptHeader(Exception):
    """A frame's header failed its checksum: the stream cannot be trusted any more."""


class Closed(Exception):
    """The peer closed the connection (or it broke)."""


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """The two AES-256-GCM keys of one connection (one per direction)."""

    to_server: bytes
    to_client: bytes


def derive_keys(material: bytes, client_random: bytes, server_random: bytes) -> SessionKeys:
    """Per-connection keys from the named key's material and both sides' randoms."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    def derive(direction: bytes) -> bytes:
        hkdf = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=client_random + server_random,
            info=b"siterecovery wire v1 " + direction,
        )
        return hkdf.derive(material)

    return SessionKeys(to_server=derive(b"to-server"), to_client=derive(b"to-client"))


PROOF_NONCE = b"\xff" * 12
"""The nonce of the key proof in WELCOME: frame nonces (``seq``) never reach it."""


def key_proof(key: bytes, server_random: bytes) -> bytes:
    """Proof that the receiver holds the same key: an empty message sealed to the client."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).encrypt(PROOF_NONCE, b"", b"siterecovery proof" + server_random)


def check_proof(key: bytes, server_random: bytes, proof: bytes, peer: str) -> None:
    """Raise DecryptionFailed when ``proof`` was not made with ``key``."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        AESGCM(key).decrypt(PROOF_NONCE, proof, b"siterecovery proof" + server_random)
    except InvalidTag:
        raise DecryptionFailed(
            peer=peer, reason="the receiver holds different key material under that name"
        ) from None


class Connection:
    """Frames over one stream. Not thread-safe.

    ``peer`` names the other side in errors. Counters: ``bytes_sent`` and
    ``bytes_received`` (headers included), ``frames_resent`` and
    ``bytes_resent`` (frames sent again, on this connection or carried over
    from a broken one: see ``send(resent=True)``).
    """

    def __init__(self, stream: Stream, peer: str) -> None:
        self._stream = stream
        self._gather = not isinstance(stream, ssl.SSLSocket) and hasattr(stream, "sendmsg")
        self.peer = peer
        self._seq = 0
        self._send_key: AESGCM | None = None
        self._recv_key: AESGCM | None = None
        self._compressor: Any = None
        self._header = memoryview(bytearray(HEADER.size))
        self._buf = memoryview(bytearray(64 * 1024))
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_resent = 0
        self.bytes_resent = 0
        self._ahead: bytes | None = None
        """Bytes :meth:`poll` read ahead on TLS (b"": the peer closed)."""

    @property
    def stream(self) -> Stream:
        return self._stream

    def configure(self, *, send_key: bytes | None, recv_key: bytes | None, compress: bool) -> None:
        """Turn on sealing (with per-direction keys) and compression of later frames."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._send_key = AESGCM(send_key) if send_key else None
        self._recv_key = AESGCM(recv_key) if recv_key else None
        if compress:
            import zstandard

            self._compressor = zstandard.ZstdCompressor(level=1)

    # Sending.

    def send(
        self,
        kind: Kind,
        *,
        offset: int = 0,
        length: int = 0,
        parts: Sequence[bytes | memoryview] = (),
        compress: bool = False,
        seq: int | None = None,
        resent: bool = False,
    ) -> Sent:
        """Encode and send one frame with the next ``seq``; returns it for :meth:`resend`.

        With ``seq`` (one already sent on this connection) the frame is
        encoded again under that number: the same arguments give the same
        bytes (zstd and AES-GCM are deterministic), so a receiver that saw it
        damaged gets it intact. ``resent`` counts a frame carried over from a
        broken connection (a new ``seq``, but bytes sent before).
        """
        again = seq is not None
        if seq is None:
            self._seq += 1
            seq = self._seq
        elif not 0 < seq <= self._seq:
            raise ValueError(f"frame {seq} was never sent on this connection")
        flags, body = self._encode(parts, compress)
        size = sum(len(part) for part in body)
        if self._send_key is not None:
            aad = _checked(kind, flags | SEALED, seq, offset, length, size + TAG)
            sealed = self._send_key.encrypt(_nonce(seq), _joined(body), aad)
            flags, body, size = flags | SEALED, [sealed], len(sealed)
        head = _checked(kind, flags, seq, offset, length, size)
        header = head + struct.pack("<IQ", _hcheck(head), _checksum(*body))
        frame = Sent(seq, (header, *body))
        if resent or again:
            self._count_resent(frame)
        self._write(frame.parts)
        return frame

    def resend(self, frame: Sent) -> None:
        """Send ``frame`` again, byte for byte (same seq, same nonce)."""
        self._count_resent(frame)
        self._write(frame.parts)

    def _count_resent(self, frame: Sent) -> None:
        self.frames_resent += 1
        self.bytes_resent += frame.size

    def _encode(
        self, parts: Sequence[bytes | memoryview], compress: bool
    ) -> tuple[int, Sequence[bytes | memoryview]]:
        if not (compress and self._compressor is not None and parts):
            return 0, parts
        plain = _joined(parts)
        packed = self._compressor.compress(plain)
        if len(packed) >= len(plain):
            return 0, parts  # Incompressible (random data): send as is.
        return COMPRESSED, [packed]

    def _write(self, parts: Sequence[bytes | memoryview]) -> None:
        views = [memoryview(part).cast("B") for part in parts if len(part)]
        try:
            if self._gather:
                self._send_gathered(cast(_Gather, self._stream), views)
            else:
                self._send_each(views)
        except OSError as e:  # ssl.SSLError included.
            raise Closed(f"cannot send to {self.peer}: {e}") from e

    def _send_gathered(self, stream: _Gather, views: list[memoryview]) -> None:
        while views:
            sent = stream.sendmsg(views)
            self.bytes_sent += sent
            views = _advance(views, sent)

    def _send_each(self, views: list[memoryview]) -> None:
        """Small leading parts joined into one ``sendall`` (one TLS record), then each large one."""
        small = total = 0
        for view in views:
            if total + len(view) > _JOIN:
                break
            small, total = small + 1, total + len(view)
        joined: list[bytes | memoryview] = [b"".join(views[:small])] if small else []
        for part in [*joined, *views[small:]]:
            self._stream.sendall(part)
            self.bytes_sent += len(part)

    # Receiving.

    def poll(self) -> bool:
        """Whether bytes of a frame are waiting (so :meth:`recv` will not wait long).

        On TLS, readable bytes may be a record that carries no data (a session
        ticket after the handshake): they are read without blocking, and any
        data is kept for :meth:`recv`.
        """
        if self._ahead is not None:
            return True
        stream = self._stream
        if isinstance(stream, ssl.SSLSocket) and stream.pending():
            return True  # Decrypted already, invisible to poll(2).
        if not _readable(stream):
            return False
        if isinstance(stream, ssl.SSLSocket):
            return self._read_ahead(stream)
        return True

    def _read_ahead(self, stream: ssl.SSLSocket) -> bool:
        try:
            stream.setblocking(False)
            try:
                self._ahead = stream.recv(HEADER.size)
            finally:
                stream.setblocking(True)
        except ssl.SSLWantReadError:
            return False  # Only TLS housekeeping, or half a record.
        except OSError:
            return True  # Broken: recv will say so.
        return True  # Data, or b"" at the end: recv will say so.

    def recv(self) -> Frame:
        """The next frame, checked and decoded.

        Raises CorruptPayload (the framing holds; answer NAK), CorruptHeader
        (the stream is lost), Closed, or DecryptionFailed (wrong key).
        """
        self._read_exactly(self._header)
        magic, kind, flags, _, seq, offset, length, size, hcheck, pcheck = HEADER.unpack(
            self._header
        )
        if magic != MAGIC or hcheck != _hcheck(self._header[:_CHECKED]) or size > MAX_PAYLOAD:
            raise CorruptHeader(f"bad frame header from {self.peer}")
        payload = self._payload(size)
        if _checksum(payload) != pcheck:
            raise CorruptPayload(seq)
        decoded = self._decode(flags, self._header[:_CHECKED], seq, payload)
        return Frame(_kind(kind, self.peer), seq, offset, length, decoded)

    def _payload(self, size: int) -> memoryview:
        if size > len(self._buf):
            self._buf = memoryview(bytearray(size))
        payload = self._buf[:size]
        self._read_exactly(payload)
        return payload

    def _decode(self, flags: int, aad: memoryview, seq: int, payload: memoryview) -> memoryview:
        if bool(flags & SEALED) != (self._recv_key is not None):
            raise DecryptionFailed(peer=self.peer, reason="one side encrypts and the other not")
        if self._recv_key is not None:
            from cryptography.exceptions import InvalidTag

            try:
                plain = self._recv_key.decrypt(_nonce(seq), bytes(payload), bytes(aad))
            except InvalidTag:
                raise DecryptionFailed(
                    peer=self.peer, reason="authentication failed (wrong key or tampered data)"
                ) from None
            payload = memoryview(plain)
        if flags & COMPRESSED:
            import zstandard

            try:
                payload = memoryview(zstandard.ZstdDecompressor().decompress(payload))
            except zstandard.ZstdError as e:
                raise WireError(peer=self.peer, detail=f"bad compressed frame {seq}: {e}") from e
        return payload

    def _read_exactly(self, view: memoryview) -> None:
        done = 0
        if self._ahead is not None:  # What poll() read: at most a header, read first.
            ahead, self._ahead = self._ahead, None
            if not ahead:
                raise Closed(f"{self.peer} closed the connection")
            done = len(ahead)
            view[:done] = ahead
        try:
            while done < len(view):
                n = self._stream.recv_into(view[done:])
                if n == 0:
                    raise Closed(f"{self.peer} closed the connection")
                done += n
        except OSError as e:
            raise Closed(f"cannot receive from {self.peer}: {e}") from e
        self.bytes_received += done

    def close(self) -> None:
        """Close the stream. Idempotent."""
        with contextlib.suppress(OSError):
            self._stream.close()


def _checked(kind: Kind, flags: int, seq: int, offset: int, length: int, size: int) -> bytes:
    return HEADER.pack(MAGIC, kind, flags, 0, seq, offset, length, size, 0, 0)[:_CHECKED]


def _hcheck(head: bytes | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(head) & 0xFFFFFFFF


def _checksum(*parts: bytes | memoryview) -> int:
    """xxh3-64 of the parts in order (streaming: releases the GIL on large parts)."""
    hasher = xxhash.xxh3_64()
    for part in parts:
        hasher.update(part)
    return int(hasher.intdigest())


def _nonce(seq: int) -> bytes:
    return seq.to_bytes(12, "little")


def _joined(parts: Sequence[bytes | memoryview]) -> bytes:
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return b"".join(parts)


def _advance(views: list[memoryview], sent: int) -> list[memoryview]:
    """The views still to send after ``sent`` bytes went out."""
    while views and sent >= len(views[0]):
        sent -= len(views[0])
        views = views[1:]
    if views and sent:
        views[0] = views[0][sent:]
    return views


def _readable(stream: Stream) -> bool:
    """Bytes (or the end) are waiting on ``stream``'s socket."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True  # Closed: recv will say so.


def _kind(value: int, peer: str) -> Kind:
    try:
        return Kind(value)
    except ValueError:
        raise WireError(peer=peer, detail=f"unknown frame kind {value}") from None
