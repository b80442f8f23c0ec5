"""The sync engine: make a target disk read the same as a source disk.

Used by initial replication (``full``), every replication cycle (``tracked``:
only what the source's dirty bitmap says changed), the fallback when change
tracking cannot be trusted (``checksum``: both sides hashed, only differing
blocks copied) and failback. The work flows through stages::

    plan ─> work items ─> workers ─────────────────────────> sink ─> watermark
            (≤ chunk_size, (own src clone, one buffer:       (dst     (flush, then
             offset order)  read, split zero/data segments)   clone)   checkpoint(offset))

* The **plan** is a list of extents: ``zero`` ones are made zero on the
  target without reading, the others are copied. It comes from the source's
  allocation map, its dirty map, or the difference of two digest arrays.
* **Workers** take items in offset order from one shared iterator (taking an
  item is the only point where they synchronise, and where ``cancelled()`` is
  polled), read each into their one reused buffer and hand zero and data
  segments to their **sink**.
* The **watermark** is the end of the longest prefix of finished items: all
  work below it is done, so after a flush it is a safe resume offset.

A later wire protocol adds stages without touching the others: a sink that
encodes, compresses and encrypts segments and sends them to the other site
(which applies them to its disk), and target digests computed where the target
lives (:func:`~siterecovery.disk.digest.block_digests` is what each side runs).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from siterecovery.disk.base import BlockDevice, Extent
from siterecovery.disk.digest import Digests, block_digests, bytes_to_hash, zero_digest
from siterecovery.domain.errors import DiskError, InvalidInput, SyncCancelled

KiB = 1024
MiB = 1024 * KiB

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; called from any thread, one call at a time."""

Checkpoint = Callable[[int], None]
"""``checkpoint(offset)``: all work below ``offset`` is done and flushed."""

Cancelled = Callable[[], bool]
"""Polled between chunks (from any thread, one call at a time); True cancels."""


class SyncMode(StrEnum):
    FULL = "full"
    TRACKED = "tracked"
    CHECKSUM = "checksum"


@dataclass(frozen=True, slots=True)
class SyncOptions:
    """How to sync. Sizes and offsets are bytes.

    ``chunk_size`` is the largest read, write or zero sent in one request
    (one work item) and a multiple of ``block_size``. ``block_size`` is the unit of checksum
    comparison and of zero detection in copied data. Its 64 KiB default comes
    from a measurement on a 256 MiB file in the page cache (``block_digests``
    with 1/2 threads): 4 KiB hashes at 7.8/11 GB/s, 16 KiB at 11.8/17.8,
    64 KiB at 13.5/20.9, 1 MiB at 14.6/24.8. Past 64 KiB the speed barely
    grows (and is ten times what a disk reads) while every scattered change
    costs more bytes to send; 64 KiB is also the granularity of qemu dirty
    bitmaps and of qcow2 clusters, and its digests weigh 1/4096 of the disk.

    ``resume_offset`` is a value once passed to ``checkpoint``; nothing below
    it is read or written (checksum mode rounds it down to a block).
    ``target_is_blank`` says the target reads as zeroes already (a new sparse
    image): zero ranges then need no request at all. ``checkpoint_every``
    is how many bytes read for copying may pass between two checkpoints.
    """

    mode: SyncMode
    threads: int = 4
    chunk_size: int = 4 * MiB
    block_size: int = 64 * KiB
    resume_offset: int = 0
    target_is_blank: bool = False
    checkpoint_every: int = 64 * MiB

    def __post_init__(self) -> None:
        for name in ("threads", "chunk_size", "block_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise InvalidInput(field=name, reason=f"{getattr(self, name)} is not positive")
        if self.chunk_size % self.block_size:
            raise InvalidInput(
                field="chunk_size",
                reason=f"{self.chunk_size} is not a multiple of block_size {self.block_size}",
            )
        if self.resume_offset < 0:
            raise InvalidInput(field="resume_offset", reason=f"{self.resume_offset} is negative")


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What a finished sync did. Bytes are counts of bytes, ``seconds`` wall time.

    ``bytes_read`` was read from the source to be copied; ``bytes_hashed`` was
    read from either disk to be hashed (checksum mode only). ``blocks_changed``
    counts differing blocks in checksum mode and chunks that wrote or zeroed
    something in the other modes.
    """

    mode: SyncMode
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    blocks_changed: int
    extents_planned: int
    resumed_from: int
    seconds: float
    bytes_hashed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``mode`` as its string value)."""
        return {**asdict(self), "mode": str(self.mode)}


class Sink(Protocol):
    """Where one worker's segments go. Not thread-safe: one per worker.

    A block device is a sink; a later one streams segments to the other site.
    """

    def write(self, offset: int, buf: memoryview) -> None:
        """Store all of ``buf`` at ``offset``; ``buf`` is reused after the call."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeroes (no data moves)."""
        ...

    def flush(self) -> None:
        """Make durable every completed write of *every* sink of the same target."""
        ...

    def close(self) -> None:
        """Release the sink. Idempotent."""
        ...


def sync(
    src: BlockDevice,
    dst: BlockDevice,
    options: SyncOptions,
    *,
    progress: Progress | None = None,
    checkpoint: Checkpoint | None = None,
    cancelled: Cancelled | None = None,
) -> SyncResult:
    """Make ``dst`` read the same as ``src`` over ``[0, src.size)``.

    ``dst`` may be larger (bytes past ``src.size`` are left alone), never
    smaller (DiskError before anything is written). ``src`` and ``dst`` are
    used from the calling thread only (planning, final flush); workers use
    clones. ``progress`` counts bytes read (total = planned reads; in checksum
    mode the total grows once, when the differing blocks are known).
    ``checkpoint`` is called after a flush of ``dst`` (through any of its
    handles), with increasing offsets, one call at a time (from a worker, or
    the calling thread on cancellation and at the end, with ``src.size``),
    about every ``checkpoint_every`` bytes copied. Raises SyncCancelled (its
    ``resume_offset`` is the last checkpoint) or the first error of any
    worker, after joining them all.
    """
    started = time.monotonic()
    _check_sizes(src, dst)
    start = _start_offset(options)
    tally = _Tally(start, progress, checkpoint, options.checkpoint_every)
    plan = _plan(src, dst, options, start, tally, cancelled)
    tally.add_total(sum(e.length for e in plan.extents if not e.zero))
    run = _Run(src, dst, options, _items(plan.extents, options.chunk_size), tally, cancelled)
    stats = run.execute()
    tally.save(dst, src.size)
    changed = stats.chunks if plan.blocks_changed is None else plan.blocks_changed
    return SyncResult(
        mode=options.mode,
        bytes_read=stats.read,
        bytes_written=stats.written,
        bytes_zeroed=stats.zeroed,
        blocks_changed=changed,
        extents_planned=len(plan.extents),
        resumed_from=start,
        seconds=time.monotonic() - started,
        bytes_hashed=plan.bytes_hashed,
    )


def _check_sizes(src: BlockDevice, dst: BlockDevice) -> None:
    if dst.size < src.size:
        raise DiskError(
            detail=f"the target ({dst.size} bytes) is smaller than the source ({src.size} bytes)"
        )


def _start_offset(options: SyncOptions) -> int:
    if options.mode is SyncMode.CHECKSUM:
        return options.resume_offset // options.block_size * options.block_size
    return options.resume_offset


# Planning.


@dataclass(frozen=True, slots=True)
class _Plan:
    """Extents in offset order: ``zero`` ones are zeroed on dst, others copied."""

    extents: list[Extent]
    blocks_changed: int | None = None
    bytes_hashed: int = 0


def _plan(
    src: BlockDevice,
    dst: BlockDevice,
    options: SyncOptions,
    start: int,
    tally: _Tally,
    cancelled: Cancelled | None,
) -> _Plan:
    if start >= src.size:
        return _Plan([])
    if options.mode is SyncMode.CHECKSUM:
        return _plan_checksum(src, dst, options, start, tally, cancelled)
    if options.mode is SyncMode.TRACKED:
        extents = list(_merged(_intersect(src.dirty_extents(start), src.extents(start))))
    else:
        extents = list(src.extents(start))
    return _Plan([e for e in extents if not (e.zero and options.target_is_blank)])


def _intersect(dirty: Iterable[Extent], allocation: Iterable[Extent]) -> Iterator[Extent]:
    """The dirty parts of the allocation map (both cover the same range, in order)."""
    alloc = iter(allocation)
    current = Extent(0, 0)
    for extent in dirty:
        pos = extent.start
        while extent.dirty and pos < extent.end:
            while current.end <= pos:
                current = _next_extent(alloc, pos)
            end = min(extent.end, current.end)
            yield Extent(pos, end - pos, zero=current.zero)
            pos = end


def _next_extent(extents: Iterator[Extent], pos: int) -> Extent:
    extent = next(extents, None)
    if extent is None:
        raise DiskError(detail=f"the allocation map ends before the dirty map, at {pos}")
    return extent


def _merged(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Join touching extents of the same kind."""
    current: Extent | None = None
    for extent in extents:
        if current and current.end == extent.start and current.zero == extent.zero:
            current = Extent(current.start, current.length + extent.length, zero=current.zero)
            continue
        if current:
            yield current
        current = extent
    if current:
        yield current


def _plan_checksum(
    src: BlockDevice,
    dst: BlockDevice,
    options: SyncOptions,
    start: int,
    tally: _Tally,
    cancelled: Cancelled | None,
) -> _Plan:
    """Hash both sides (src holes by the zero digest, unread); plan the differing blocks."""
    bs, length = options.block_size, src.size - start
    tally.add_total(bytes_to_hash(src, bs, start, length) + bytes_to_hash(dst, bs, start, length))
    before = tally.done
    hash_blocks = functools.partial(
        block_digests, block_size=bs, offset=start, length=length,
        threads=options.threads, on_read=tally.read, cancelled=cancelled,
    )  # fmt: skip
    try:
        theirs, ours = hash_blocks(dst), hash_blocks(src)
    except SyncCancelled:
        raise SyncCancelled(what="checksum sync", resume_offset=start) from None
    extents, changed = _diff(ours, theirs, start, bs, src.size)
    return _Plan(extents, blocks_changed=changed, bytes_hashed=tally.done - before)


def _diff(
    ours: Digests, theirs: Digests, start: int, bs: int, end: int
) -> tuple[list[Extent], int]:
    """Runs of differing blocks; a run is ``zero`` when our blocks are all zero."""
    changed = np.flatnonzero((ours != theirs).any(axis=1))
    zero = _zero_blocks(ours, bs, end - start)[changed]
    breaks = np.flatnonzero((np.diff(changed) != 1) | (np.diff(zero) != 0)) + 1
    extents = []
    for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(changed)], strict=True):
        if last > first:
            run_start = start + int(changed[first]) * bs
            run_end = min(end, start + (int(changed[last - 1]) + 1) * bs)
            extents.append(Extent(run_start, run_end - run_start, zero=bool(zero[first])))
    return extents, len(changed)


def _zero_blocks(digests: Digests, bs: int, length: int) -> npt.NDArray[np.bool_]:
    """Which blocks read as zeroes (the last block may be short)."""
    zero_row = np.frombuffer(zero_digest(bs), dtype=np.uint8)
    zero: npt.NDArray[np.bool_] = (digests == zero_row).all(axis=1)
    if length % bs:
        zero[-1] = digests[-1].tobytes() == zero_digest(length % bs)
    return zero


def _items(extents: Iterable[Extent], chunk_size: int) -> Iterator[Extent]:
    """The plan cut at multiples of ``chunk_size`` (disk offsets), in order."""
    for extent in extents:
        pos = extent.start
        while pos < extent.end:
            end = min(extent.end, (pos // chunk_size + 1) * chunk_size)
            yield Extent(pos, end - pos, zero=extent.zero)
            pos = end


# Progress, watermark and checkpoints.


class _Tally:
    """Progress, the watermark and the checkpoints of one sync. Thread-safe."""

    def __init__(
        self, start: int, progress: Progress | None, checkpoint: Checkpoint | None, every: int
    ) -> None:
        self._lock = threading.Lock()
        self._progress = progress
        self._checkpoint = checkpoint
        self._every = every
        self._done = 0
        self._total = 0
        self._finished: dict[int, int] = {}
        self._next_seq = 0
        self._watermark = start
        self._saved = start
        self._copied = 0
        self._copied_at_save = 0
        self._saving = threading.Lock()

    @property
    def done(self) -> int:
        return self._done

    @property
    def saved(self) -> int:
        """The last offset passed to ``checkpoint`` (the start before any)."""
        return self._saved

    def add_total(self, nbytes: int) -> None:
        with self._lock:
            self._total += nbytes
            self._report()

    def read(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            self._report()

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self._done, self._total)

    def finish(self, seq: int, end: int, nbytes: int) -> bool:
        """Item ``seq`` (ending at ``end``) is done after reading ``nbytes``.

        Returns whether a checkpoint is due.
        """
        with self._lock:
            self._finished[seq] = end
            while self._next_seq in self._finished:
                self._watermark = self._finished.pop(self._next_seq)
                self._next_seq += 1
            self._done += nbytes
            self._copied += nbytes
            self._report()
            return self._copied - self._copied_at_save >= self._every

    def save(self, sink: Sink, offset: int | None = None) -> None:
        """Flush ``sink`` and checkpoint the watermark (or ``offset``, when all is done).

        Skipped when another thread is saving (it will), or nothing new is done.
        """
        if not self._saving.acquire(blocking=False):
            return
        try:
            with self._lock:
                target = self._watermark if offset is None else offset
                copied = self._copied
            if target > self._saved:
                sink.flush()
                if self._checkpoint is not None:
                    self._checkpoint(target)
                self._saved, self._copied_at_save = target, copied
        finally:
            self._saving.release()


# Workers.


@dataclass(slots=True)
class _Stats:
    """Bytes one worker moved (summed over workers at the end)."""

    read: int = 0
    written: int = 0
    zeroed: int = 0
    chunks: int = 0

    def add(self, other: _Stats) -> None:
        self.read += other.read
        self.written += other.written
        self.zeroed += other.zeroed
        self.chunks += other.chunks


class _Run:
    """The workers of one sync and what they share: the items, the first error."""

    def __init__(
        self,
        src: BlockDevice,
        dst: BlockDevice,
        options: SyncOptions,
        items: Iterator[Extent],
        tally: _Tally,
        cancelled: Cancelled | None,
    ) -> None:
        self._src = src
        self._dst = dst
        self._options = options
        self._items = enumerate(items)
        self._tally = tally
        self._cancelled = cancelled
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._stopped = False
        self._stats = _Stats()

    def execute(self) -> _Stats:
        """Run the workers, join them all; raise the first error, then SyncCancelled."""
        threads = [
            threading.Thread(target=self._work, name=f"sync-{i}")
            for i in range(self._options.threads)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        if self._stopped:
            self._tally.save(self._dst)
            what = f"{self._options.mode} sync"
            raise SyncCancelled(what=what, resume_offset=self._tally.saved)
        return self._stats

    def take(self) -> tuple[int, Extent] | None:
        """The next item and its sequence number; None when done, failed or cancelled."""
        with self._lock:
            if self._errors or self._stopped:
                return None
            if self._cancelled is not None and self._cancelled():
                self._stopped = True
                return None
            return next(self._items, None)

    def _work(self) -> None:
        try:
            worker = _Worker.open(self._src, self._dst, self._options)
            try:
                stats = worker.drain(self, self._tally)
            finally:
                worker.close()
            with self._lock:
                self._stats.add(stats)
        except BaseException as e:
            with self._lock:
                self._errors.append(e)


class _Worker:
    """One thread's clones and its one reused buffer."""

    def __init__(self, src: BlockDevice, sink: Sink, options: SyncOptions) -> None:
        self._src = src
        self._sink = sink
        self._grain = options.block_size
        self._blank = options.target_is_blank
        self._buf = memoryview(bytearray(options.chunk_size))
        self._stats = _Stats()

    @classmethod
    def open(cls, src: BlockDevice, dst: BlockDevice, options: SyncOptions) -> _Worker:
        """A worker with its own clones of ``src`` and ``dst``."""
        src = src.clone()
        try:
            return cls(src, dst.clone(), options)
        except BaseException:
            src.close()
            raise

    def drain(self, run: _Run, tally: _Tally) -> _Stats:
        """Process items until there are none; report each to ``tally``."""
        while (taken := run.take()) is not None:
            seq, item = taken
            before = self._stats.read
            self._process(item)
            if tally.finish(seq, item.end, self._stats.read - before):
                tally.save(self._sink)
        return self._stats

    def _process(self, item: Extent) -> None:
        moved = self._stats.written + self._stats.zeroed
        if item.zero:
            self._zero(item.start, item.length)  # Fast path.
        else:
            self._copy(item)  # Slow path.
        if self._stats.written + self._stats.zeroed > moved:
            self._stats.chunks += 1

    def _copy(self, item: Extent) -> None:
        view = self._buf[: item.length]
        self._src.readinto(item.start, view)
        self._stats.read += item.length
        for start, length, zero in _segments(view, item.start, self._grain):
            if zero:
                self._zero(item.start + start, length)
            else:
                self._sink.write(item.start + start, view[start : start + length])
                self._stats.written += length

    def _zero(self, offset: int, length: int) -> None:
        if not self._blank:
            self._sink.zero(offset, length)
            self._stats.zeroed += length

    def close(self) -> None:
        try:
            self._src.close()
        finally:
            self._sink.close()


def _segments(view: memoryview, offset: int, grain: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, length, zero)`` runs of ``view`` (read at disk ``offset``).

    Zero is decided per ``grain``-aligned block (in disk offsets); adjacent
    blocks of the same kind form one run.
    """
    run_start, run_zero, pos = 0, False, 0
    while pos < len(view):
        end = min(len(view), (offset + pos) // grain * grain + grain - offset)
        zero = not np.frombuffer(view[pos:end], dtype=np.uint8).any()
        if pos > run_start and zero != run_zero:
            yield run_start, pos - run_start, run_zero
            run_start = pos
        run_zero, pos = zero, end
    if pos > run_start:
        yield run_start, pos - run_start, run_zero
