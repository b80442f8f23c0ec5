"""The sync engine on real sparse files and a real qemu-storage-daemon export.

Every test ends by comparing whole-disk digests of source and target.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.base import BlockDevice
from siterecovery.disk.digest import bytes_to_hash, disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.disk.wrappers import CountingDevice, RateLimitedDevice
from siterecovery.domain.errors import DiskError, InvalidInput, SyncCancelled
from siterecovery.replication.pipeline import segments
from siterecovery.replication.sync import SyncMode, SyncOptions, SyncResult, sync

KiB = 1024
MiB = 1024 * KiB
SIZE = 64 * MiB
ZEROED = (32 * MiB, 33 * MiB)
"""A range of the source written with zeroes: allocated, but must stay a hole on dst."""

Ranges = list[tuple[int, int]]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short private directory (unix socket paths fit), removed at teardown."""
    path = Path(tempfile.mkdtemp(prefix="sr-sync-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def scatter(path: Path, seed: int, count: int = 24, size: int = SIZE) -> None:
    """A sparse raw image: ``count`` random-data extents, then :data:`ZEROED` written."""
    create_raw(path, size)
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(count):
            length = rng.randrange(4 * KiB, 2 * MiB, 4 * KiB)
            os.pwrite(fd, rng.randbytes(length), rng.randrange(0, size - length, 4 * KiB))
        os.pwrite(fd, bytes(ZEROED[1] - ZEROED[0]), ZEROED[0])
    finally:
        os.close(fd)


def data_ranges(dev: BlockDevice) -> Ranges:
    return [(e.start, e.end) for e in dev.extents() if not e.zero]


def allocated(dev: BlockDevice, start: int = 0) -> int:
    return sum(max(0, end - max(begin, start)) for begin, end in data_ranges(dev))


def without(ranges: Ranges, cut: tuple[int, int]) -> Ranges:
    """``ranges`` minus ``cut``."""
    out = []
    for start, end in ranges:
        out += [(s, e) for s, e in ((start, min(end, cut[0])), (max(start, cut[1]), end)) if e > s]
    return out


def fresh(path: Path, size: int = SIZE) -> FileDevice:
    create_raw(path, size)
    return FileDevice.open(path, writable=True)


def same(a: SyncResult, b: SyncResult) -> bool:
    fields = ("bytes_read", "bytes_written", "bytes_zeroed", "blocks_changed", "extents_planned")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


@pytest.mark.parametrize("blank", [True, False], ids=["blank", "not-blank"])
def test_full_sync_copies_allocated_data_and_keeps_holes(workdir: Path, blank: bool) -> None:
    scatter(workdir / "src.raw", seed=1)
    calls: list[tuple[int, int]] = []
    with FileDevice.open(workdir / "src.raw") as inner, fresh(workdir / "dst.raw") as dst:
        src = CountingDevice(inner)
        options = SyncOptions(SyncMode.FULL, target_is_blank=blank)
        result = sync(src, dst, options, progress=lambda d, t: calls.append((d, t)))
        data = allocated(inner)
        assert disk_digest(dst) == disk_digest(inner)
        assert data_ranges(dst) == without(data_ranges(inner), ZEROED)
        assert result.bytes_read == src.counts.bytes_read == data
        assert result.bytes_written == data - (ZEROED[1] - ZEROED[0])
        assert result.bytes_zeroed == (0 if blank else SIZE - result.bytes_written)
        assert calls[-1] == (data, data)
        assert all(a[0] <= b[0] for a, b in itertools.pairwise(calls))


def test_full_sync_over_a_dirty_target_punches_its_holes(workdir: Path) -> None:
    scatter(workdir / "src.raw", seed=2)
    (workdir / "dst.raw").write_bytes(os.urandom(SIZE))
    with (
        FileDevice.open(workdir / "src.raw") as src,
        FileDevice.open(workdir / "dst.raw", writable=True) as dst,
    ):
        sync(src, dst, SyncOptions(SyncMode.FULL, threads=3))
        assert disk_digest(dst) == disk_digest(src)
        assert data_ranges(dst) == without(data_ranges(src), ZEROED)


@pytest.mark.parametrize("mode", [SyncMode.FULL, SyncMode.CHECKSUM])
def test_one_thread_and_four_threads_give_the_same_result(workdir: Path, mode: SyncMode) -> None:
    scatter(workdir / "src.raw", seed=3, count=40)
    results, digests = [], []
    with FileDevice.open(workdir / "src.raw") as src:
        for threads in (1, 4):
            with fresh(workdir / f"dst{threads}.raw") as dst:
                results.append(sync(src, dst, SyncOptions(mode, threads=threads)))
                digests.append(disk_digest(dst))
        assert same(results[0], results[1])
        assert digests[0] == digests[1] == disk_digest(src)


def test_checksum_sync_copies_only_the_changed_blocks(workdir: Path) -> None:
    scatter(workdir / "src.raw", seed=4)
    k, block = 7, 64 * KiB
    rng = random.Random(4)
    with (
        FileDevice.open(workdir / "src.raw", writable=True) as src,
        fresh(workdir / "dst.raw") as dst,
    ):
        sync(src, dst, SyncOptions(SyncMode.FULL))
        for index in rng.sample(range(SIZE // block), k):
            src.write(index * block, memoryview(rng.randbytes(block)))
        hole = next(e for e in src.extents() if e.zero and e.length >= 2 * block)
        stale = -(-hole.start // block) * block
        dst.write(stale, memoryview(rng.randbytes(block)))  # Where src reads zeroes.
        hashed = bytes_to_hash(src, block) + bytes_to_hash(dst, block)
        counted = CountingDevice(src)
        result = sync(counted, dst, SyncOptions(SyncMode.CHECKSUM, block_size=block))
        assert disk_digest(dst) == disk_digest(src)
        assert result.bytes_written == k * block
        assert result.bytes_zeroed == block
        assert result.blocks_changed == k + 1
        assert result.bytes_read == k * block
        assert result.bytes_hashed == hashed
        assert stale not in {start for start, _ in data_ranges(dst)}


@pytest.mark.parametrize("mode", [SyncMode.FULL, SyncMode.CHECKSUM])
def test_cancelled_sync_resumes_from_its_last_checkpoint(workdir: Path, mode: SyncMode) -> None:
    scatter(workdir / "src.raw", seed=5, count=60)
    checkpoints: list[int] = []
    options = SyncOptions(mode, threads=2, chunk_size=256 * KiB, checkpoint_every=2 * MiB)
    with FileDevice.open(workdir / "src.raw") as src, fresh(workdir / "dst.raw") as dst:
        slow = RateLimitedDevice(dst, 64 * MiB)  # Far from done at the 2nd checkpoint.
        with pytest.raises(SyncCancelled) as cancelled:
            sync(src, slow, options, checkpoint=checkpoints.append,
                 cancelled=lambda: len(checkpoints) >= 2)  # fmt: skip
        last = checkpoints[-1]
        assert checkpoints == sorted(set(checkpoints)) and 0 < last < SIZE
        assert cancelled.value.fields["resume_offset"] == last
        assert disk_digest(dst) != disk_digest(src)
        src_bytes, dst_bytes = (
            (workdir / "src.raw").read_bytes(),
            (workdir / "dst.raw").read_bytes(),
        )
        assert src_bytes[:last] == dst_bytes[:last]

        resumed = sync(src, dst, SyncOptions(mode, resume_offset=last))
        assert disk_digest(dst) == disk_digest(src)
        assert resumed.resumed_from == last
        assert 0 < resumed.bytes_read < allocated(src)
        if mode is SyncMode.FULL:
            assert resumed.bytes_read == allocated(src, start=last)


class StallingDevice(CountingDevice):
    """Test double: reads at ``stall_at`` wait until ``release`` is set (all clones)."""

    def __init__(self, inner: BlockDevice, stall_at: int, release: threading.Event) -> None:
        super().__init__(inner)
        self._stall_at = stall_at
        self._release = release

    def readinto(self, offset: int, buf: memoryview) -> None:
        if offset == self._stall_at:
            assert self._release.wait(30)
        super().readinto(offset, buf)

    def clone(self) -> StallingDevice:
        return StallingDevice(self.inner.clone(), self._stall_at, self._release)


def prefix(path: Path, length: int) -> bytes:
    with path.open("rb") as f:
        return f.read(length)


def test_checkpoints_wait_for_every_item_below_them(workdir: Path) -> None:
    """The first item stalls while the other worker finishes many: no checkpoint
    may pass it, and every checkpoint's prefix is already equal on both sides."""
    src_path, dst_path = workdir / "src.raw", workdir / "dst.raw"
    scatter(src_path, seed=12, count=60)
    release, polls, checkpoints = threading.Event(), [], []

    def cancelled() -> bool:
        polls.append(1)
        if len(polls) >= 40:
            release.set()
        return False

    def checkpoint(offset: int) -> None:
        checkpoints.append(offset)
        if prefix(src_path, offset) != prefix(dst_path, offset):
            release.set()  # Fail fast: the stalled worker must not wait for its timeout.
            raise AssertionError(f"checkpoint {offset} passed work not yet done")

    options = SyncOptions(SyncMode.FULL, threads=2, chunk_size=256 * KiB, checkpoint_every=MiB)
    with FileDevice.open(src_path) as inner, fresh(dst_path) as dst:
        first = data_ranges(inner)[0][0]
        src = StallingDevice(inner, first, release)
        sync(src, dst, options, checkpoint=checkpoint, cancelled=cancelled)
        assert disk_digest(dst) == disk_digest(inner)
    assert len(checkpoints) >= 2 and checkpoints[-1] == SIZE


def test_tracked_sync_reads_only_the_dirty_extents(workdir: Path) -> None:
    base = workdir / "base.raw"
    scatter(base, seed=6)
    image = workdir / "src.qcow2"
    qemu_img.convert(base, image, src_fmt="raw", dst_fmt="qcow2")
    qemu_img.add_bitmap(image, "cp1")
    with FileDevice.open(base) as src, fresh(workdir / "dst.raw") as dst:
        sync(src, dst, SyncOptions(SyncMode.FULL, target_is_blank=True))
    daemon = StorageDaemon.start(workdir / "run", [DiskSpec("src", image)], detached=False)
    try:
        daemon.qmp().execute(
            "block-export-add", type="nbd", id="src-cp1", name="src-cp1",
            writable=True, bitmaps=["cp1"], **{"node-name": "src"},
        )  # fmt: skip
        written = change_through_nbd(daemon)
        check_tracked_sync(daemon, workdir / "dst.raw", written)
    finally:
        daemon.stop()


def change_through_nbd(daemon: StorageDaemon) -> int:
    """Write three spaced random ranges and zero :data:`ZEROED`; bytes written."""
    rng = random.Random(6)
    lengths = (64 * KiB, 192 * KiB, 512 * KiB)
    with NbdDevice.connect(daemon.nbd_socket, "src", writable=True) as dev:
        for i, length in enumerate(lengths):
            dev.write(i * 20 * MiB + 3 * MiB, memoryview(rng.randbytes(length)))
        dev.zero(8 * MiB, MiB)
        dev.flush()
    return sum(lengths)


def check_tracked_sync(daemon: StorageDaemon, dst_path: Path, written: int) -> None:
    with (
        NbdDevice.connect(daemon.nbd_socket, "src-cp1", bitmap="cp1") as inner,
        FileDevice.open(dst_path, writable=True) as dst,
    ):
        assert disk_digest(dst) != disk_digest(inner)
        src = CountingDevice(inner)
        result = sync(src, dst, SyncOptions(SyncMode.TRACKED, threads=3))
        assert disk_digest(dst) == disk_digest(inner)
        assert result.bytes_read == src.counts.bytes_read == written
        assert result.bytes_written == written
        assert result.bytes_zeroed == MiB


def test_tracked_sync_of_a_file_without_tracking_is_a_disk_error(workdir: Path) -> None:
    scatter(workdir / "src.raw", seed=7, count=2)
    with (
        FileDevice.open(workdir / "src.raw") as src,
        fresh(workdir / "dst.raw") as dst,
        pytest.raises(DiskError, match="no change tracking"),
    ):
        sync(src, dst, SyncOptions(SyncMode.TRACKED))


def test_an_error_in_a_worker_is_raised(workdir: Path) -> None:
    scatter(workdir / "src.raw", seed=8)
    create_raw(workdir / "dst.raw", SIZE)
    with FileDevice.open(workdir / "src.raw") as src, FileDevice.open(workdir / "dst.raw") as dst:
        with pytest.raises(DiskError, match="read-only"):
            sync(src, dst, SyncOptions(SyncMode.FULL, threads=4, chunk_size=256 * KiB))
        assert data_ranges(dst) == []


def test_a_target_smaller_than_the_source_is_refused_before_any_write(workdir: Path) -> None:
    scatter(workdir / "src.raw", seed=9)
    with FileDevice.open(workdir / "src.raw") as src, fresh(workdir / "dst.raw", SIZE - MiB) as dst:
        with pytest.raises(DiskError, match="smaller"):
            sync(src, dst, SyncOptions(SyncMode.FULL))
        assert data_ranges(dst) == []


def test_resuming_at_the_end_does_nothing(workdir: Path) -> None:
    scatter(workdir / "src.raw", seed=10, count=3)
    with FileDevice.open(workdir / "src.raw") as src, fresh(workdir / "dst.raw") as dst:
        result = sync(src, dst, SyncOptions(SyncMode.FULL, resume_offset=SIZE))
        assert (result.bytes_read, result.bytes_written, result.extents_planned) == (0, 0, 0)
        assert data_ranges(dst) == []


def test_result_is_json_ready(workdir: Path) -> None:
    scatter(workdir / "src.raw", seed=11, count=3)
    with FileDevice.open(workdir / "src.raw") as src, fresh(workdir / "dst.raw") as dst:
        result = sync(src, dst, SyncOptions(SyncMode.FULL))
    loaded = json.loads(json.dumps(result.to_dict()))
    assert loaded["mode"] == "full" and loaded["bytes_read"] == result.bytes_read


@pytest.mark.parametrize(
    "changes",
    [{"threads": 0}, {"chunk_size": 100 * KiB}, {"block_size": -1}, {"resume_offset": -1}],
    ids=str,
)
def test_bad_options_are_refused(changes: dict[str, int]) -> None:
    with pytest.raises(InvalidInput):
        SyncOptions(SyncMode.FULL, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("offset", [0, 4 * KiB, 64 * KiB - 512, 3 * 64 * KiB])
def test_segments_split_a_chunk_at_zero_and_data_blocks(offset: int) -> None:
    """The vectorised split agrees with a block-by-block scan, at any alignment."""
    grain, rng = 64 * KiB, random.Random(offset)
    buf = bytearray(1 * MiB + 12 * KiB)
    for index in rng.sample(range(len(buf) // (4 * KiB)), 40):
        buf[index * 4 * KiB : index * 4 * KiB + 7] = rng.randbytes(7)
    view = memoryview(buf)
    expected, pos = [], 0
    while pos < len(view):
        end = min(len(view), (offset + pos) // grain * grain + grain - offset)
        zero = not any(view[pos:end])
        if expected and expected[-1][2] == zero:
            expected[-1] = (expected[-1][0], end - expected[-1][0], zero)
        else:
            expected.append((pos, end - pos, zero))
        pos = end
    assert segments(view, offset, grain) == expected
    assert sum(length for _, length, _ in expected) == len(view)


def test_checkpoints_need_flushes(workdir: Path) -> None:
    scatter(workdir / "src.raw", seed=13, count=2)
    with FileDevice.open(workdir / "src.raw") as src, fresh(workdir / "dst.raw") as dst:
        with pytest.raises(InvalidInput, match="flush"):
            sync(src, dst, SyncOptions(SyncMode.FULL, flush=False), checkpoint=lambda _: None)
        result = sync(src, dst, SyncOptions(SyncMode.FULL, flush=False))
        assert result.bytes_read == allocated(src) and disk_digest(dst) == disk_digest(src)
