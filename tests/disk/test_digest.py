"""Block digests and whole-disk digests on real sparse files and a real NBD export."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import xxhash

from siterecovery.disk import qemu_img
from siterecovery.disk.digest import (
    DISK_DIGEST_ALGORITHM,
    block_digests,
    bytes_to_hash,
    disk_digest,
    zero_digest,
)
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec
from siterecovery.disk.wrappers import CountingDevice
from siterecovery.domain.errors import InvalidInput, SyncCancelled

from .support import KiB, MiB, StartQsd

SIZE = 32 * MiB


def scatter(path: Path, size: int, seed: int, count: int = 12) -> list[tuple[int, int]]:
    """A sparse raw image with ``count`` random-data extents; returns them."""
    create_raw(path, size)
    rng = random.Random(seed)
    written = []
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(count):
            offset = rng.randrange(0, size - MiB, 4 * KiB)
            length = rng.randrange(4 * KiB, MiB, 4 * KiB)
            os.pwrite(fd, rng.randbytes(length), offset)
            written.append((offset, length))
    finally:
        os.close(fd)
    return written


def allocated(dev: FileDevice) -> int:
    return sum(e.length for e in dev.extents() if not e.zero)


def reference_digests(path: Path, block_size: int) -> list[bytes]:
    """Digests computed the plain way: read every block, hash it (no fast path)."""
    data = path.read_bytes()
    return [
        xxhash.xxh3_128_digest(data[pos : pos + block_size])
        for pos in range(0, len(data), block_size)
    ]


def test_a_hole_and_written_zeroes_have_the_same_digest(tmp_path: Path) -> None:
    create_raw(tmp_path / "hole.raw", SIZE)
    (tmp_path / "zeroes.raw").write_bytes(bytes(SIZE))
    with (
        FileDevice.open(tmp_path / "hole.raw") as hole,
        FileDevice.open(tmp_path / "zeroes.raw") as zeroes,
    ):
        assert allocated(hole) == 0 and allocated(zeroes) == SIZE
        assert disk_digest(hole) == disk_digest(zeroes)


def test_disk_digest_names_its_algorithm_and_changes_with_one_byte(tmp_path: Path) -> None:
    scatter(tmp_path / "a.raw", SIZE, seed=1)
    with FileDevice.open(tmp_path / "a.raw", writable=True) as dev:
        before = disk_digest(dev)
        assert before.startswith(f"{DISK_DIGEST_ALGORITHM}:")
        assert len(before.split(":")[1]) == 64
        dev.write(SIZE - 1, memoryview(b"\x01"))
        assert disk_digest(dev) != before


def test_disk_digest_covers_the_size(tmp_path: Path) -> None:
    create_raw(tmp_path / "a.raw", SIZE)
    create_raw(tmp_path / "b.raw", SIZE + MiB)
    with FileDevice.open(tmp_path / "a.raw") as a, FileDevice.open(tmp_path / "b.raw") as b:
        assert disk_digest(a) != disk_digest(b)


def test_block_digests_equal_plain_hashes_and_skip_holes(tmp_path: Path) -> None:
    path = tmp_path / "a.raw"
    scatter(path, SIZE, seed=2)
    with FileDevice.open(path) as inner:
        dev = CountingDevice(inner)
        digests = block_digests(dev, 64 * KiB, threads=3)
        expected = reference_digests(path, 64 * KiB)
        assert [row.tobytes() for row in digests] == expected
        assert dev.counts.bytes_read == bytes_to_hash(inner, 64 * KiB)
        assert allocated(inner) <= dev.counts.bytes_read < SIZE // 2


def test_block_digests_of_a_short_last_block_and_a_subrange(tmp_path: Path) -> None:
    size = 5 * MiB + 12 * KiB
    path = tmp_path / "odd.raw"
    scatter(path, size, seed=3, count=4)
    with FileDevice.open(path) as dev:
        expected = reference_digests(path, MiB)
        assert [row.tobytes() for row in block_digests(dev, MiB)] == expected
        tail = block_digests(dev, MiB, offset=2 * MiB, length=size - 2 * MiB)
        assert [row.tobytes() for row in tail] == expected[2:]
    create_raw(tmp_path / "hole.raw", size)
    with FileDevice.open(tmp_path / "hole.raw") as hole:
        last = block_digests(hole, MiB)[-1].tobytes()
        assert last == zero_digest(12 * KiB) == xxhash.xxh3_128_digest(bytes(12 * KiB))


def test_threads_do_not_change_the_digests(tmp_path: Path) -> None:
    scatter(tmp_path / "a.raw", SIZE, seed=4, count=40)
    with FileDevice.open(tmp_path / "a.raw") as dev:
        one = block_digests(dev, 64 * KiB, threads=1)
        four = block_digests(dev, 64 * KiB, threads=4)
        assert np.array_equal(one, four)
        assert disk_digest(dev, threads=1) == disk_digest(dev, threads=4)


def test_unaligned_offset_is_refused(tmp_path: Path) -> None:
    create_raw(tmp_path / "a.raw", SIZE)
    with FileDevice.open(tmp_path / "a.raw") as dev, pytest.raises(InvalidInput):
        block_digests(dev, 64 * KiB, offset=4 * KiB)


def test_cancelled_digest_raises(tmp_path: Path) -> None:
    (tmp_path / "a.raw").write_bytes(os.urandom(SIZE))
    polls = iter(range(1000))
    with FileDevice.open(tmp_path / "a.raw") as inner:
        dev = CountingDevice(inner)
        with pytest.raises(SyncCancelled):
            block_digests(dev, 64 * KiB, cancelled=lambda: next(polls) >= 2)
        assert 0 < dev.counts.bytes_read < SIZE


def test_nbd_export_and_raw_file_of_the_same_bytes_have_the_same_digest(
    workdir: Path, qsd: StartQsd
) -> None:
    raw = workdir / "a.raw"
    scatter(raw, SIZE, seed=5)
    image = workdir / "a.qcow2"
    qemu_img.convert(raw, image, src_fmt="raw", dst_fmt="qcow2")
    daemon = qsd([DiskSpec("d0", image, writable=False)])
    with FileDevice.open(raw) as file, NbdDevice.connect(daemon.nbd_socket, "d0") as export:
        assert disk_digest(export) == disk_digest(file)
