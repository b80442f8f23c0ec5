"""The device wrappers: the BlockDevice contract through them, and what each adds.

The whole contract suite of ``test_contract`` runs again here with every
wrapper around every backend (``opener`` below replaces the one there).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.base import BlockDevice
from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec
from siterecovery.disk.wrappers import CountingDevice, IoCounts, RateLimitedDevice, TokenBucket
from siterecovery.domain.errors import InvalidInput
from siterecovery.replication.sync import SyncMode, SyncOptions, sync

from . import test_contract
from .support import DISK_SIZE, NODE, KiB, MiB, StartQsd

Opener = Callable[..., BlockDevice]
Wrap = Callable[[BlockDevice], BlockDevice]

WRAPPERS: dict[str, Wrap] = {
    "counting": CountingDevice,
    "rate-limited": lambda dev: RateLimitedDevice(dev, 16 * 1024 * MiB),
}

# The contract suite, collected again in this module with the ``opener`` below.
globals().update(
    {name: getattr(test_contract, name) for name in dir(test_contract) if name.startswith("test_")}
)
device = test_contract.device


@pytest.fixture(params=[f"{w}-{b}" for w in WRAPPERS for b in ("file", "nbd")])
def opener(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Opener]:
    """``opener(writable=True)``: a wrapped handle on one fresh, empty disk."""
    wrapper, backend = request.param.rsplit("-", 1)
    opened: list[BlockDevice] = []
    if backend == "file":
        path = workdir / "disk.raw"
        create_raw(path, DISK_SIZE)

        def open_inner(writable: bool) -> BlockDevice:
            return FileDevice.open(path, writable=writable)
    else:
        image = workdir / "disk.qcow2"
        qemu_img.create(image, DISK_SIZE)
        start: StartQsd = request.getfixturevalue("qsd")
        daemon = start([DiskSpec(NODE, image)])

        def open_inner(writable: bool) -> BlockDevice:
            return NbdDevice.connect(daemon.nbd_socket, NODE, writable=writable)

    def open_wrapped(writable: bool = True) -> BlockDevice:
        opened.append(WRAPPERS[wrapper](open_inner(writable)))
        return opened[-1]

    yield open_wrapped
    for dev in opened:
        dev.close()


@pytest.fixture
def raw(workdir: Path) -> Iterator[FileDevice]:
    create_raw(workdir / "w.raw", 16 * MiB)
    with FileDevice.open(workdir / "w.raw", writable=True) as dev:
        yield dev


def test_counting_counts_bytes_and_calls(raw: FileDevice) -> None:
    dev = CountingDevice(raw)
    dev.write(0, memoryview(os.urandom(3 * MiB)))
    dev.zero(MiB, 512 * KiB)
    dev.readinto(0, memoryview(bytearray(100)))
    list(dev.extents())
    dev.flush()
    assert dev.counts == IoCounts(100, 3 * MiB, 512 * KiB, reads=1, writes=1, zeroes=1)


def test_counting_clones_share_counters_across_threads(raw: FileDevice) -> None:
    dev = CountingDevice(raw)

    def work() -> None:
        clone = dev.clone()
        try:
            for i in range(50):
                clone.readinto(i * 4 * KiB, memoryview(bytearray(4 * KiB)))
        finally:
            clone.close()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert dev.counts.bytes_read == 4 * 50 * 4 * KiB
    assert dev.counts.reads == 200


def test_failed_calls_are_not_counted(workdir: Path) -> None:
    create_raw(workdir / "ro.raw", MiB)
    with FileDevice.open(workdir / "ro.raw") as inner:
        dev = CountingDevice(inner)
        with pytest.raises(Exception, match="read-only"):
            dev.write(0, memoryview(b"x"))
        assert dev.counts == IoCounts()


def test_wrappers_delegate_dirty_extents(workdir: Path, qsd: StartQsd) -> None:
    image = workdir / "t.qcow2"
    qemu_img.create(image, DISK_SIZE)
    qemu_img.add_bitmap(image, "cp1")
    daemon = qsd([DiskSpec(NODE, image)])
    daemon.qmp().execute(
        "block-export-add", type="nbd", id="t-cp1", name="t-cp1",
        writable=True, bitmaps=["cp1"], **{"node-name": NODE},
    )  # fmt: skip
    inner = NbdDevice.connect(daemon.nbd_socket, "t-cp1", writable=True, bitmap="cp1")
    dev = RateLimitedDevice(CountingDevice(inner), 1024 * MiB)
    try:
        dev.write(2 * MiB, memoryview(os.urandom(64 * KiB)))
        clone = dev.clone()
        dirty = [(e.start, e.length) for e in clone.dirty_extents() if e.dirty]
        clone.close()
        assert dirty == [(2 * MiB, 64 * KiB)]
    finally:
        dev.close()


def test_rate_limited_sync_moves_the_same_bytes(workdir: Path) -> None:
    src_path, dst_path = workdir / "s.raw", workdir / "d.raw"
    create_raw(src_path, 16 * MiB)
    create_raw(dst_path, 16 * MiB)
    with FileDevice.open(src_path, writable=True) as src:
        src.write(MiB, memoryview(os.urandom(3 * MiB)))
    with FileDevice.open(src_path) as src, FileDevice.open(dst_path, writable=True) as dst:
        counted = CountingDevice(dst)
        limited = RateLimitedDevice(counted, 64 * MiB)
        result = sync(src, limited, SyncOptions(SyncMode.FULL, threads=3, chunk_size=256 * KiB))
        assert disk_digest(dst) == disk_digest(src)
        assert result.bytes_written == counted.counts.bytes_written == 3 * MiB


def test_rate_limited_clones_share_one_bucket(raw: FileDevice) -> None:
    dev = RateLimitedDevice(raw, 8 * MiB, burst=MiB)
    clone = dev.clone()
    try:
        assert clone.bucket is dev.bucket
        assert clone.bytes_per_second == 8 * MiB
    finally:
        clone.close()


def test_token_bucket_refuses_a_zero_rate() -> None:
    with pytest.raises(InvalidInput):
        TokenBucket(0, 1)


def test_token_bucket_spends_its_burst_then_charges_the_debt() -> None:
    bucket = TokenBucket(MiB, MiB)
    assert bucket.debit(MiB) < 0.01
    assert 1.9 < bucket.debit(2 * MiB) <= 2.0
    assert 2.9 < bucket.debit(MiB) <= 3.0
