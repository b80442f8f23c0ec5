"""The sync engine over the wire: a RemoteDevice target and a real Receiver.

Every sync ends by comparing whole-disk digests of source and target. The
only test doubles are stream wrappers around real sockets, named as such:
one records what is sent, one damages a chosen frame once.
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.disk.wrappers import RateLimitedDevice
from siterecovery.domain.errors import DecryptionFailed, DiskError, SyncCancelled
from siterecovery.keys import SecretKey, generate
from siterecovery.replication.sync import SyncMode, SyncOptions, sync
from siterecovery.wire import address
from siterecovery.wire.client import WINDOW, RemoteDevice
from siterecovery.wire.frames import HEADER, MAGIC, Kind

from .conftest import SIZE, ZEROED, KiB, MiB, StartReceiver, data_ranges, scatter

BLOCK = 64 * KiB


def key(name: str = "site-key") -> SecretKey:
    return generate(name, datetime.now(UTC))


def connect(where: str, size: int = SIZE, **kwargs: object) -> RemoteDevice:
    return RemoteDevice.connect(where, size=size, **kwargs)  # type: ignore[arg-type]


def allocated(path: Path) -> int:
    with FileDevice.open(path) as dev:
        return sum(end - start for start, end in data_ranges(dev))


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_full_sync_over_the_wire_moves_data_once_and_keeps_holes(
    workdir: Path, receive: StartReceiver, transport: str
) -> None:
    scatter(workdir / "src.raw", seed=1)
    served = receive(workdir / "dst.raw", transport=transport)
    with FileDevice.open(workdir / "src.raw") as src, connect(served.address) as dst:
        assert dst.welcome.created  # The receiver made the missing target: blank.
        options = SyncOptions(SyncMode.FULL, threads=3, target_is_blank=True)
        result = sync(src, dst, options)
        assert dst.disk_digest() == disk_digest(src)
        counts = dst.counts
    data = allocated(workdir / "src.raw")
    moved = data - (ZEROED[1] - ZEROED[0])
    assert result.bytes_read == data and result.bytes_written == moved
    assert served.receiver.counts.bytes_written == moved
    assert moved < counts.bytes_sent < moved * 1.01 + 64 * KiB  # Headers and tables only.
    with FileDevice.open(workdir / "src.raw") as src, FileDevice.open(workdir / "dst.raw") as dst:
        assert data_ranges(dst) == without(data_ranges(src), ZEROED)


def without(ranges: list[tuple[int, int]], cut: tuple[int, int]) -> list[tuple[int, int]]:
    out = []
    for start, end in ranges:
        out += [(s, e) for s, e in ((start, min(end, cut[0])), (max(start, cut[1]), end)) if e > s]
    return out


def changed_copy(workdir: Path, blocks: int, seed: int) -> tuple[Path, Path]:
    """A source and an older copy of it: ``blocks`` random 64 KiB blocks differ."""
    src, old = workdir / "src.raw", workdir / "old.raw"
    scatter(old, seed=seed)
    create_raw(src, SIZE)
    with FileDevice.open(old) as a, FileDevice.open(src, writable=True) as b:
        sync(a, b, SyncOptions(SyncMode.FULL, target_is_blank=True))
        rng = random.Random(seed)
        for index in rng.sample(range(SIZE // BLOCK), blocks):
            b.write(index * BLOCK, memoryview(rng.randbytes(BLOCK)))
    return src, old


def test_checksum_sync_over_the_wire_sends_only_digests_and_changed_blocks(
    workdir: Path, receive: StartReceiver
) -> None:
    k = 9
    src_path, old = changed_copy(workdir, blocks=k, seed=2)
    served = receive(old)
    with FileDevice.open(src_path) as src, connect(served.address) as dst:
        assert not dst.welcome.created
        result = sync(src, dst, SyncOptions(SyncMode.CHECKSUM, threads=2))
        assert dst.disk_digest() == disk_digest(src)
        counts = dst.counts
    digest_list = SIZE // BLOCK * 16
    assert result.blocks_changed == k and result.bytes_written == k * BLOCK
    assert served.receiver.counts.bytes_written == k * BLOCK
    assert result.bytes_hashed >= allocated(src_path)  # Both sides, each where it lives.
    assert k * BLOCK < counts.bytes_sent < k * BLOCK + 16 * KiB
    assert digest_list < counts.bytes_received < digest_list + 16 * KiB


class RecordingStream:
    """Test double: a real socket that also keeps every byte it sends."""

    def __init__(self, sock: socket.socket, record: bytearray) -> None:
        self._sock = sock
        self._record = record

    def sendmsg(self, buffers: Sequence[bytes | memoryview], /) -> int:
        sent = self._sock.sendmsg(buffers)
        self._record += b"".join(bytes(b) for b in buffers)[:sent]
        return sent

    def sendall(self, data: bytes | memoryview, /) -> None:
        self._sock.sendall(data)
        self._record += data

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        return self._sock.recv_into(buffer, nbytes)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


class DamagingStream(RecordingStream):
    """Test double: damages the ``nth`` DATA frame sent through any stream sharing
    ``state`` (one byte of its payload, or of its header), once."""

    def __init__(self, sock: socket.socket, state: dict[str, int], *, where: str) -> None:
        super().__init__(sock, bytearray())
        self._state = state
        self._where = where

    def sendmsg(self, buffers: Sequence[bytes | memoryview], /) -> int:
        first = bytes(buffers[0][:5])
        if len(buffers) > 1 and first[:4] == MAGIC and first[4] == Kind.DATA:
            with LOCK:
                self._state["seen"] += 1
                hit = self._state["seen"] == self._state["nth"]
            if hit:
                buffers = self._damaged(buffers)
        return super().sendmsg(buffers)

    def _damaged(self, buffers: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
        index, pos = (0, 20) if self._where == "header" else (len(buffers) - 1, 7)
        part = bytearray(buffers[index])
        part[pos] ^= 0xFF
        return [*buffers[:index], bytes(part), *buffers[index + 1 :]]


LOCK = threading.Lock()


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_damaged_frame_is_detected_and_sent_again(
    workdir: Path, receive: StartReceiver, where: str
) -> None:
    scatter(workdir / "src.raw", seed=3)
    served = receive(workdir / "dst.raw")
    state = {"seen": 0, "nth": 5}
    target = address.parse(served.address)

    def dial() -> DamagingStream:
        return DamagingStream(address.dial(target), state, where=where)

    src = FileDevice.open(workdir / "src.raw")
    with src, RemoteDevice.connect(served.address, size=SIZE, dial=dial) as dst:
        sync(src, dst, SyncOptions(SyncMode.FULL, threads=2, chunk_size=256 * KiB))
        assert dst.disk_digest() == disk_digest(src)
        counts = dst.counts
    assert state["seen"] > state["nth"]
    if where == "payload":  # Checksum mismatch: NAK, that frame and the later ones again.
        assert served.receiver.counts.corrupt_frames == 1
        assert counts.frames_resent >= 1 and counts.reconnects == 0
    else:  # The framing is lost: the receiver hangs up, the sender reconnects
        assert counts.reconnects == 1  # and sends its window again.
        assert 0 < counts.resent_bytes <= WINDOW * (256 * KiB + 4 * KiB)


def recorded_sync(
    workdir: Path, receive: StartReceiver, *, sender_key: SecretKey | None, compress: bool
) -> bytes:
    """Sync src.raw through a RecordingStream; everything the sender put on the wire."""
    served = receive(workdir / "dst.raw", key=sender_key)
    record = bytearray()
    target = address.parse(served.address)
    with FileDevice.open(workdir / "src.raw") as src, RemoteDevice.connect(
        served.address, size=SIZE, key=sender_key, compress=compress,
        dial=lambda: RecordingStream(address.dial(target), record),
    ) as dst:  # fmt: skip
        sync(src, dst, SyncOptions(SyncMode.FULL, threads=2))
        assert dst.disk_digest() == disk_digest(src)
    return bytes(record)


def test_an_encrypted_stream_does_not_contain_the_plaintext(
    workdir: Path, receive: StartReceiver
) -> None:
    scatter(workdir / "src.raw", seed=4)
    with FileDevice.open(workdir / "src.raw") as src:
        start = data_ranges(src)[0][0]
        probe = memoryview(bytearray(256))
        src.readinto(start, probe)
    plain = recorded_sync(workdir, receive, sender_key=None, compress=False)
    assert bytes(probe) in plain  # The recording does capture the data...
    (workdir / "dst.raw").unlink()
    sealed = recorded_sync(workdir, receive, sender_key=key(), compress=True)
    assert bytes(probe) not in sealed  # ...which encryption hides.
    assert len(sealed) > allocated(workdir / "src.raw") // 2


def test_the_wrong_key_fails_with_a_clear_error(workdir: Path, receive: StartReceiver) -> None:
    served = receive(workdir / "dst.raw", key=key())
    with pytest.raises(DecryptionFailed) as wrong:
        connect(served.address, key=key())  # Same name, other material.
    assert wrong.value.code == "DECRYPTION_FAILED" and "fingerprints differ" in str(wrong.value)
    with pytest.raises(DecryptionFailed, match="requires encryption"):
        connect(served.address)
    plain = receive(workdir / "other.raw")
    with pytest.raises(DecryptionFailed, match="no key"):
        connect(plain.address, key=key())


def test_compression_shrinks_compressible_data(workdir: Path, receive: StartReceiver) -> None:
    create_raw(workdir / "src.raw", SIZE)
    text = b"".join(b"line %08d of a very compressible log\n" % i for i in range(200_000))
    with FileDevice.open(workdir / "src.raw", writable=True) as dev:
        dev.write(MiB, memoryview(text))
    served = receive(workdir / "dst.raw")
    with FileDevice.open(workdir / "src.raw") as src, connect(served.address, compress=True) as dst:
        sync(src, dst, SyncOptions(SyncMode.FULL, target_is_blank=True))
        assert dst.disk_digest() == disk_digest(src)
        assert dst.counts.bytes_sent < len(text) // 4


def test_a_sync_over_the_wire_resumes_from_the_receivers_mark(
    workdir: Path, receive: StartReceiver
) -> None:
    scatter(workdir / "src.raw", seed=5, count=40)
    served = receive(workdir / "dst.raw")
    options = SyncOptions(SyncMode.FULL, threads=2, chunk_size=256 * KiB, checkpoint_every=MiB)
    marks: list[int] = []
    with FileDevice.open(workdir / "src.raw") as inner:
        src = RateLimitedDevice(inner, 32 * MiB)  # Far from done at the 2nd checkpoint.
        with connect(served.address, job="job-1") as dst, pytest.raises(SyncCancelled):

            def mark(offset: int) -> None:
                dst.mark(offset)
                marks.append(offset)

            sync(src, dst, options, checkpoint=mark, cancelled=lambda: len(marks) >= 2)
        with connect(served.address, job="job-2") as other:
            assert other.welcome.resume_offset == 0  # Marks belong to their job.
        with connect(served.address, job="job-1") as dst:
            resume = dst.welcome.resume_offset
            assert resume == marks[-1] and 0 < resume < SIZE
            resumed = sync(inner, dst, SyncOptions(SyncMode.FULL, resume_offset=resume))
            assert dst.disk_digest() == disk_digest(inner)
            dst.done()
        assert 0 < resumed.bytes_read < allocated(workdir / "src.raw")
        with connect(served.address, job="job-1") as dst:
            assert dst.welcome.resume_offset == 0  # Done: the mark is forgotten.


def test_errors_of_the_receiver_come_back_with_their_code(
    workdir: Path, receive: StartReceiver
) -> None:
    create_raw(workdir / "small.raw", SIZE // 2)
    served = receive(workdir / "small.raw")
    with pytest.raises(DiskError, match="smaller") as refused:
        connect(served.address)
    assert refused.value.code == "DISK_ERROR"


def test_a_remote_device_reads_writes_zeroes_and_maps(
    workdir: Path, receive: StartReceiver
) -> None:
    served = receive(workdir / "dst.raw")
    data = random.Random(6).randbytes(3 * MiB)
    with connect(served.address) as dev:
        dev.write(MiB, memoryview(data))
        dev.zero(2 * MiB, 512 * KiB)
        dev.flush()
        back = memoryview(bytearray(3 * MiB))
        dev.readinto(MiB, back)
        expected = data[:MiB] + bytes(512 * KiB) + data[MiB + 512 * KiB :]
        assert bytes(back) == expected
        extents = [(e.start, e.length, e.zero) for e in dev.extents()]
        assert (MiB, MiB, False) in extents and (2 * MiB, 512 * KiB, True) in extents
        with pytest.raises(DiskError, match="no change tracking"):
            dev.dirty_extents()
        with pytest.raises(DiskError, match="outside"):
            dev.readinto(SIZE - 1, memoryview(bytearray(2)))


def test_a_qcow2_target_is_served_by_a_private_storage_daemon(
    workdir: Path, receive: StartReceiver
) -> None:
    scatter(workdir / "src.raw", seed=7)
    served = receive(workdir / "dst.qcow2")
    with FileDevice.open(workdir / "src.raw") as src, connect(served.address) as dst:
        sync(src, dst, SyncOptions(SyncMode.FULL, target_is_blank=dst.welcome.created))
        assert dst.disk_digest() == disk_digest(src)
    assert (workdir / "dst.qcow2").read_bytes()[:4] == b"QFI\xfb"
    assert HEADER.size == 48
