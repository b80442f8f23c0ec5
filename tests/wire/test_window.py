"""The window: writes in flight without waiting, and the receiver's go-back-N rules.

The rules are driven frame by frame on a raw socket: the test encodes
frames itself (a Connection writing into a buffer), damages one, and reads
the receiver's answers in order. Answers that must not exist would show up
as the next answer read, so nothing waits on a timer.
"""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from siterecovery.disk.base import BlockDevice, Extent
from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.replication.sync import SyncMode, SyncOptions, sync
from siterecovery.wire import address
from siterecovery.wire.client import COUNT, SEGMENT, VERSION, RemoteDevice
from siterecovery.wire.frames import Connection, Kind

from .conftest import SIZE, KiB, MiB, StartReceiver, scatter

STEP = 256 * KiB


class GatedDevice:
    """Test double: a target whose writes wait until ``gate`` is set."""

    def __init__(self, inner: BlockDevice, gate: threading.Event) -> None:
        self._inner = inner
        self._gate = gate

    @property
    def size(self) -> int:
        return self._inner.size

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._inner.readinto(offset, buf)

    def write(self, offset: int, buf: memoryview) -> None:
        self._gate.wait()
        self._inner.write(offset, buf)

    def zero(self, offset: int, length: int) -> None:
        self._inner.zero(offset, length)

    def flush(self) -> None:
        self._inner.flush()

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        return self._inner.extents(offset, length)

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        return self._inner.dirty_extents(offset, length)

    def clone(self) -> GatedDevice:
        return GatedDevice(self._inner.clone(), self._gate)

    def close(self) -> None:
        self._inner.close()


def test_writes_do_not_wait_for_their_ack_up_to_the_window(
    workdir: Path, receive: StartReceiver
) -> None:
    gate = threading.Event()
    served = receive(workdir / "dst.raw", wrap=lambda dev: GatedDevice(dev, gate))
    rng = random.Random(1)
    blocks = [rng.randbytes(16 * KiB) for _ in range(40)]
    with RemoteDevice.connect(served.address, size=SIZE, window=4) as dev:
        for index in range(4):  # The receiver is stuck in the first write...
            dev.write(index * STEP, memoryview(blocks[index]))
        assert dev.in_flight[0] == 4 and dev.in_flight[1] >= 4 * 16 * KiB  # ...we are not.
        assert served.receiver.counts.bytes_written == 0
        gate.set()
        for index in range(4, len(blocks)):
            dev.write(index * STEP, memoryview(blocks[index]))
            assert dev.in_flight[0] <= 4
        dev.flush()  # Means: everything before is applied.
        assert dev.in_flight == (0, 0)
        assert served.receiver.counts.bytes_written == len(blocks) * 16 * KiB
        back = memoryview(bytearray(16 * KiB))
        for index, block in enumerate(blocks):
            dev.readinto(index * STEP, back)
            assert bytes(back) == block


def test_the_callers_buffer_is_reusable_as_soon_as_write_returns(
    workdir: Path, receive: StartReceiver
) -> None:
    served = receive(workdir / "dst.raw")
    buf = memoryview(bytearray(256 * KiB))
    expected = []
    with RemoteDevice.connect(served.address, size=SIZE) as dev:
        for index in range(16):
            buf[:] = os.urandom(len(buf))  # Like the engine: one buffer, refilled.
            dev.write(index * len(buf), buf)
            expected.append(bytes(buf))
        dev.flush()
        assert dev.disk_digest() == digest_of(workdir / "dst.raw")
    with FileDevice.open(workdir / "dst.raw") as dst:
        back = memoryview(bytearray(16 * len(buf)))
        dst.readinto(0, back)
    assert bytes(back) == b"".join(expected)


def digest_of(path: Path) -> str:
    with FileDevice.open(path) as dev:
        return disk_digest(dev)


def test_a_stop_and_wait_sender_still_syncs(workdir: Path, receive: StartReceiver) -> None:
    scatter(workdir / "src.raw", seed=11)
    served = receive(workdir / "dst.raw")
    src = FileDevice.open(workdir / "src.raw")
    with src, RemoteDevice.connect(served.address, size=SIZE, window=1) as dst:
        sync(src, dst, SyncOptions(SyncMode.FULL, threads=2, target_is_blank=True))
        assert dst.disk_digest() == disk_digest(src)


class Capture:
    """Test double: a stream that keeps what is sent (to encode frames by hand)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def sendall(self, data: bytes | memoryview, /) -> None:
        self.data += data

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        raise AssertionError("nothing to receive")

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        pass


class Hand:
    """A sender written by hand: encodes frames, sends their bytes, reads answers."""

    def __init__(self, where: str) -> None:
        self._capture = Capture()
        self._encoder = Connection(self._capture, "test")
        self.sock = address.dial(address.parse(where))
        self.answers = Connection(self.sock, "receiver")

    def encode(self, kind: Kind, *, seq: int | None = None, offset: int = 0, length: int = 0,
               parts: Sequence[bytes] = ()) -> bytearray:  # fmt: skip
        self._capture.data = bytearray()
        self._encoder.send(kind, offset=offset, length=length, parts=parts, seq=seq)
        return self._capture.data

    def data(self, offset: int, payload: bytes, seq: int | None = None) -> bytearray:
        table = COUNT.pack(1) + SEGMENT.pack(0, len(payload), False)
        return self.encode(Kind.DATA, seq=seq, offset=offset, length=len(payload),
                           parts=[table, payload])  # fmt: skip

    def send(self, *frames: bytes | bytearray) -> None:
        for frame in frames:
            self.sock.sendall(frame)

    def answer(self) -> tuple[Kind, int]:
        reply = self.answers.recv()
        return reply.kind, reply.offset

    def hello(self) -> None:
        doc = {"version": VERSION, "size": SIZE, "job": "", "key": None,
               "random": os.urandom(16).hex(), "ticket": None, "stream": "hand"}  # fmt: skip
        self.send(self.encode(Kind.HELLO, parts=[json.dumps(doc).encode()]))
        assert self.answer()[0] is Kind.WELCOME

    def close(self) -> None:
        self.sock.close()


def damaged(frame: bytearray) -> bytes:
    copy = bytearray(frame)
    copy[-7] ^= 0xFF  # A payload byte: pcheck fails, the header holds.
    return bytes(copy)


def test_after_a_nak_the_receiver_discards_until_the_frame_comes_again(
    workdir: Path, receive: StartReceiver
) -> None:
    create_raw(workdir / "dst.raw", SIZE)
    served = receive(workdir / "dst.raw")
    rng = random.Random(2)
    chunks = [rng.randbytes(64 * KiB) for _ in range(3)]
    hand = Hand(served.address)
    try:
        hand.hello()  # seq 1
        frames = [hand.data(i * MiB, chunk) for i, chunk in enumerate(chunks)]  # seq 2, 3, 4
        hand.send(damaged(frames[0]), frames[1], frames[2])
        assert hand.answer() == (Kind.NAK, 2)  # Nothing for 3 and 4: discarded.
        hand.send(*(hand.data(i * MiB, c, seq=2 + i) for i, c in enumerate(chunks)))
        assert [hand.answer() for _ in range(3)] == [(Kind.ACK, 2), (Kind.ACK, 3), (Kind.ACK, 4)]
        hand.send(hand.data(MiB, chunks[1], seq=3))  # A repeat: answered, not applied.
        assert hand.answer() == (Kind.ACK, 3)
        hand.send(hand.encode(Kind.FLUSH))  # seq 5
        assert hand.answer() == (Kind.ACK, 5)
    finally:
        hand.close()
    counts = served.receiver.counts
    assert counts.corrupt_frames == 1 and counts.frames == 4  # 3 DATA and FLUSH, once each.
    assert counts.bytes_written == 3 * 64 * KiB
    with FileDevice.open(workdir / "dst.raw") as dst:
        back = memoryview(bytearray(64 * KiB))
        for index, chunk in enumerate(chunks):
            dst.readinto(index * MiB, back)
            assert bytes(back) == chunk


def test_a_frame_past_the_expected_one_without_a_nak_is_refused(
    workdir: Path, receive: StartReceiver
) -> None:
    served = receive(workdir / "dst.raw")
    hand = Hand(served.address)
    try:
        hand.hello()
        hand.send(hand.data(0, b"x" * 4096, seq=None))  # seq 2: applied
        assert hand.answer() == (Kind.ACK, 2)
        hand.encode(Kind.ZERO, offset=0, length=4096)  # seq 3, never sent: a gap.
        hand.send(hand.encode(Kind.ZERO, offset=0, length=4096))  # seq 4
        kind, _ = hand.answer()
        assert kind is Kind.ERROR
    finally:
        hand.close()
    assert served.receiver.counts.bytes_zeroed == 0
