"""The BlockDevice contract, run against every implementation.

``FileDevice`` on a sparse raw file and ``NbdDevice`` on a qcow2 served by a real
qemu-storage-daemon pass the same tests.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.base import BlockDevice, EarlyWriteback, Extent
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec
from siterecovery.domain.errors import DiskError

from .support import DISK_SIZE, NODE, KiB, MiB, StartQsd, digest, pattern, read, sha, write

Opener = Callable[..., BlockDevice]


@pytest.fixture(params=["file", "nbd"])
def opener(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Opener]:
    """``opener(writable=True)`` opens a new handle on one fresh, empty disk."""
    opened: list[BlockDevice] = []
    if request.param == "file":
        path = workdir / "disk.raw"
        create_raw(path, DISK_SIZE)

        def open_file(writable: bool = True) -> BlockDevice:
            opened.append(FileDevice.open(path, writable=writable))
            return opened[-1]

        yield open_file
    else:
        image = workdir / "disk.qcow2"
        qemu_img.create(image, DISK_SIZE)
        start: StartQsd = request.getfixturevalue("qsd")
        daemon = start([DiskSpec(NODE, image)])

        def open_nbd(writable: bool = True) -> BlockDevice:
            opened.append(NbdDevice.connect(daemon.nbd_socket, NODE, writable=writable))
            return opened[-1]

        yield open_nbd
    for device in opened:
        device.close()


@pytest.fixture
def device(opener: Opener) -> BlockDevice:
    return opener()


def assert_covers(extents: list[Extent], start: int, end: int) -> None:
    """In order, contiguous, and exactly ``[start, end)``."""
    assert extents, "no extents"
    assert extents[0].start == start
    assert extents[-1].end == end
    assert all(e.length > 0 for e in extents)
    for before, after in itertools.pairwise(extents):
        assert before.end == after.start


def data_ranges(extents: list[Extent]) -> list[tuple[int, int]]:
    return [(e.start, e.end) for e in extents if not e.zero]


def test_implements_the_protocol(device: BlockDevice) -> None:
    assert isinstance(device, BlockDevice)


def test_size_is_the_virtual_size(device: BlockDevice) -> None:
    assert device.size == DISK_SIZE


def test_fresh_disk_reads_as_zeroes(device: BlockDevice) -> None:
    assert digest(device) == sha(bytes(DISK_SIZE))


def test_write_then_read_round_trip(device: BlockDevice) -> None:
    data = os.urandom(3 * MiB + 123)
    device.write(5 * MiB + 7, memoryview(data))
    assert sha(read(device, 5 * MiB + 7, len(data))) == sha(data)
    assert read(device, 5 * MiB + 6, 1) == b"\0"
    assert read(device, 8 * MiB + 130, 1) == b"\0"


def test_requests_larger_than_the_nbd_maximum_are_split(device: BlockDevice) -> None:
    data = os.urandom(40 * MiB)
    device.write(MiB, memoryview(data))
    assert digest(device, MiB, len(data)) == sha(data)
    buf = bytearray(40 * MiB)
    device.readinto(MiB, memoryview(buf))
    assert sha(buf) == sha(data)


def test_short_and_unaligned_ranges(device: BlockDevice) -> None:
    device.write(64 * KiB - 3, memoryview(b"abcdef"))
    assert read(device, 64 * KiB - 4, 8) == b"\0abcdef\0"
    assert read(device, 64 * KiB - 1, 1) == b"c"
    device.write(DISK_SIZE - 5, memoryview(b"tail!"))
    assert read(device, DISK_SIZE - 7, 7) == b"\0\0tail!"


def test_read_into_a_slice_of_a_larger_buffer(device: BlockDevice) -> None:
    write(device, 0, 0x41)
    buf = bytearray(b"x" * 300)
    device.readinto(10, memoryview(buf)[100:200])
    assert buf == b"x" * 100 + b"A" * 100 + b"x" * 100


def test_empty_io_is_allowed(device: BlockDevice) -> None:
    device.readinto(DISK_SIZE, memoryview(bytearray()))
    device.write(0, memoryview(b""))


@pytest.mark.parametrize(
    ("offset", "length"), [(DISK_SIZE - 4, 5), (DISK_SIZE, 1), (-1, 2)], ids=str
)
def test_io_outside_the_disk_is_a_disk_error(device: BlockDevice, offset: int, length: int) -> None:
    with pytest.raises(DiskError):
        device.readinto(offset, memoryview(bytearray(length)))
    with pytest.raises(DiskError):
        device.write(offset, pattern(1, length))
    with pytest.raises(DiskError):
        device.zero(offset, length)
    with pytest.raises(DiskError):
        list(device.extents(offset, length))


def test_zero_makes_the_range_read_as_zeroes(device: BlockDevice) -> None:
    write(device, 0, 0x5A, 4 * MiB)
    device.zero(MiB + 100, MiB)
    assert read(device, MiB + 99, 1) == b"\x5a"
    assert digest(device, MiB + 100, MiB) == sha(bytes(MiB))
    assert read(device, 2 * MiB + 100, 1) == b"\x5a"


def test_zero_punches_holes(device: BlockDevice) -> None:
    write(device, 0, 0x5A, 4 * MiB)
    device.zero(MiB, 2 * MiB)
    assert data_ranges(list(device.extents(0, 4 * MiB))) == [(0, MiB), (3 * MiB, 4 * MiB)]


def test_extents_cover_the_disk_and_report_holes(device: BlockDevice) -> None:
    write(device, 4 * MiB, 0x33, MiB)
    extents = list(device.extents())
    assert_covers(extents, 0, DISK_SIZE)
    assert data_ranges(extents) == [(4 * MiB, 5 * MiB)]


def test_extents_of_an_unaligned_subrange(device: BlockDevice) -> None:
    write(device, 4 * MiB, 0x33, MiB)
    extents = list(device.extents(3 * MiB + 1, 2 * MiB + 3))
    assert_covers(extents, 3 * MiB + 1, 5 * MiB + 4)
    assert data_ranges(extents) == [(4 * MiB, 5 * MiB)]


def test_extents_of_a_fresh_disk_are_one_hole(device: BlockDevice) -> None:
    assert list(device.extents()) == [Extent(0, DISK_SIZE, zero=True)]


def test_flush_is_idempotent(device: BlockDevice) -> None:
    write(device, 0, 1)
    device.flush()
    device.flush()


def test_dirty_extents_without_a_checkpoint_is_a_disk_error(device: BlockDevice) -> None:
    with pytest.raises(DiskError):
        list(device.dirty_extents())


def test_clone_is_an_independent_handle(device: BlockDevice) -> None:
    write(device, 0, 0x11)
    clone = device.clone()
    try:
        device.close()
        assert read(clone, 0, 4) == b"\x11" * 4
        write(clone, 0, 0x22)
        assert clone.size == DISK_SIZE
    finally:
        clone.close()


def test_writes_through_one_handle_are_seen_by_another(opener: Opener) -> None:
    first, second = opener(), opener()
    write(first, MiB, 0x77)
    first.flush()
    assert read(second, MiB, 2) == b"\x77\x77"


def test_read_only_handle_refuses_writes(opener: Opener) -> None:
    device = opener(writable=False)
    with pytest.raises(DiskError):
        write(device, 0, 1)
    with pytest.raises(DiskError):
        device.zero(0, MiB)
    assert read(device, 0, 1) == b"\0"


def test_close_is_idempotent_and_final(device: BlockDevice) -> None:
    device.close()
    device.close()
    with pytest.raises(DiskError):
        read(device, 0, 1)
    with pytest.raises(DiskError):
        write(device, 0, 1)
    with pytest.raises(DiskError):
        list(device.extents())


def test_a_file_device_can_start_writeback_early(tmp_path: Path) -> None:
    """``start_writeback`` is a hint: the data reads back the same and the
    final flush still succeeds (docs/PERFORMANCE.md has what it gains)."""
    create_raw(tmp_path / "d.raw", 4 << 20)
    data = os.urandom(1 << 20)
    with FileDevice.open(tmp_path / "d.raw", writable=True) as dev:
        assert isinstance(dev, EarlyWriteback)
        dev.write(1 << 20, memoryview(data))
        dev.start_writeback(1 << 20, len(data))
        dev.flush()
        back = bytearray(len(data))
        dev.readinto(1 << 20, memoryview(back))
    assert bytes(back) == data
