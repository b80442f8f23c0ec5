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


# -- a bucket shared by concurrent takers, on a clock only the test moves ----------


class StepClock:
    """One taker's clock: ``sleep`` moves time on at once."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SharedClock:
    """The clock of ``workers`` threads: time stands still while any of them
    runs, and jumps to the earliest deadline once every one sleeps or is done
    (:meth:`run`). So what a thread sees happens at exactly the time it reads."""

    def __init__(self, workers: int) -> None:
        self.now = 0.0
        self._cond = threading.Condition()
        self._running = workers
        self._deadlines: list[float] = []

    def __call__(self) -> float:
        with self._cond:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._cond:
            deadline = self.now + seconds
            if deadline <= self.now:
                return
            self._deadlines.append(deadline)
            self._running -= 1
            self._cond.notify_all()
            assert self._cond.wait_for(lambda: self.now >= deadline, timeout=30)

    def done(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def run(self) -> None:
        """Move time until every worker is done."""
        with self._cond:
            while True:
                assert self._cond.wait_for(lambda: self._running == 0, timeout=30)
                if not self._deadlines:
                    return
                self.now = min(self._deadlines)
                due = [d for d in self._deadlines if d <= self.now]
                self._deadlines = [d for d in self._deadlines if d > self.now]
                self._running += len(due)
                self._cond.notify_all()


def test_threads_sharing_a_bucket_get_no_more_than_rate_times_elapsed_plus_burst() -> None:
    rate, burst, workers = 1000, 250, 4
    clock = SharedClock(workers)
    bucket = TokenBucket(rate, burst, clock=clock, sleep=clock.sleep)
    granted: list[tuple[float, int]] = []
    lock = threading.Lock()

    def draw(sizes: list[int]) -> None:
        try:
            for n in sizes:
                bucket.take(n)
                with lock:
                    granted.append((clock(), n))
        finally:
            clock.done()

    sizes = [[(37 * i + 101 * w) % 400 + 1 for i in range(15)] for w in range(workers)]
    threads = [threading.Thread(target=draw, args=(s,)) for s in sizes]
    for thread in threads:
        thread.start()
    clock.run()
    for thread in threads:
        thread.join(timeout=10)
    assert len(granted) == 15 * workers
    total = 0
    for at, n in sorted(granted):
        total += n
        assert total <= rate * at + burst + 1e-6, (at, total)
    # Nor does it hold them back: the last one goes when the rate allows it.
    assert max(at for at, _ in granted) <= (total - burst) / rate + 1e-6


def test_a_take_stops_waiting_within_a_slice_of_its_own_interrupt() -> None:
    clock = StepClock()
    never = lambda: False  # noqa: E731 - the bucket's own check, overridden per take
    bucket = TokenBucket(1000, 1, interrupt=never, clock=clock, sleep=clock.sleep)
    slept = bucket.take(10_001, interrupt=lambda: clock.now >= 0.5)
    assert 0.5 <= slept <= 0.5 + TokenBucket.SLICE


def test_set_rate_changes_the_rate_of_a_running_bucket_and_zero_lifts_it() -> None:
    clock = StepClock()
    bucket = TokenBucket(1000, 250, clock=clock, sleep=clock.sleep)
    assert bucket.take(250) == 0.0  # the burst
    assert bucket.take(1000) == pytest.approx(1.0)
    bucket.set_rate(0)
    assert bucket.take(10**9) == 0.0 and bucket.rate == 0
    bucket.set_rate(2000)
    assert bucket.burst == 500
    clock.now += 10.0  # idle: at most the new burst is saved
    assert bucket.take(500) == 0.0
    assert bucket.take(2000) == pytest.approx(1.0)
    with pytest.raises(InvalidInput):
        bucket.set_rate(-1)


def test_devices_sharing_a_bucket_each_count_their_own_waits(raw: FileDevice) -> None:
    clock = StepClock()
    shared = TokenBucket(MiB, 1, clock=clock, sleep=clock.sleep)
    first = RateLimitedDevice(raw, 0, bucket=shared)
    second = RateLimitedDevice(raw, 0, bucket=shared)
    buf = memoryview(bytearray(MiB))
    first.readinto(0, buf)  # 1 MiB of debt: 1 s
    second.readinto(0, buf)
    clone = second.clone()
    try:
        clone.readinto(0, buf)  # a clone counts with its device
    finally:
        clone.close()
    assert first.waited_seconds == pytest.approx(1.0)
    assert second.waited_seconds == pytest.approx(2.0)
    assert clock.now == pytest.approx(3.0)  # one bucket: 3 MiB took 3 s, not 1 s each
