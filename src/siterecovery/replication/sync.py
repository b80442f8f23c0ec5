"""The sync engine: make a target disk read the same as a source disk.

Used by initial replication (``full``), every replication cycle (``tracked``:
only what the source's dirty bitmap says changed), the fallback when change
tracking cannot be trusted (``checksum``: both sides hashed, only differing
blocks copied), failback and the standalone ``siterecovery sync`` command.
The work flows through stages (:mod:`~siterecovery.replication.pipeline`)::

    plan ─> items ─> readers ── bounded queue ──> writers ─> watermark
            (≤ chunk_size,  (own src clone,        (own dst clone    (flush, then
             offset order)   pooled buffers)        or connection)    checkpoint(offset))

* The **plan** (:mod:`~siterecovery.replication.plan`) is a list of extents:
  ``zero`` ones are made zero on the target without reading, the others are
  copied. It comes from the source's allocation map, its dirty map, or the
  difference of two digest arrays.
* In checksum mode each side hashes its own disk, at the same time: a target
  that can hash where it lives (a :class:`DigestSource`, such as a wire
  connection to the other site) sends only its digest list.
* The target may be a wire connection (:mod:`siterecovery.wire`): its writers
  then frame, compress and encrypt each chunk and send it to the receiver,
  which verifies it and applies it to its disk.
* The **watermark** is the end of the longest prefix of finished items: all
  work below it is done, so after a flush it is a safe resume offset.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from siterecovery.disk.base import BlockDevice, Extent
from siterecovery.disk.digest import Digests, block_digests, bytes_to_hash, hash_plan
from siterecovery.domain.errors import DiskError, InvalidInput, SyncCancelled
from siterecovery.replication import plan as planning
from siterecovery.replication.pipeline import (
    Cancelled,
    Checkpoint,
    Pipeline,
    Progress,
    Sink,
    Stage,
    Tally,
)

__all__ = [
    "Cancelled",
    "Checkpoint",
    "DigestSource",
    "Progress",
    "Sink",
    "SyncMode",
    "SyncOptions",
    "SyncResult",
    "sync",
]

T = TypeVar("T")

KiB = 1024
MiB = 1024 * KiB


class SyncMode(StrEnum):
    FULL = "full"
    TRACKED = "tracked"
    CHECKSUM = "checksum"


@dataclass(frozen=True, slots=True)
class SyncOptions:
    """How to sync. Sizes and offsets are bytes.

    ``threads`` is the number of readers, and of hashers on each side in
    checksum mode; writers are half as many (at least one). Each worker has its
    own source or target handle (so its own NBD or wire connection). Measured
    (docs/PERFORMANCE.md): buffered writes to one file serialise on its inode
    lock, so one writer is best there; an NBD target does best with two.

    ``chunk_size`` is the largest read, write or zero sent in one request
    (one work item, one buffer, one wire frame) and a multiple of
    ``block_size``. Its 1 MiB default was measured (docs/PERFORMANCE.md):
    buffers that stay in the CPU caches copy up to twice as fast as 4 MiB
    ones, and fewer than ~256 KiB costs more in per-item overhead.

    ``block_size`` is the unit of checksum comparison and of zero detection in
    copied data. Its 64 KiB default comes from a measurement on a 256 MiB file
    in the page cache (``block_digests`` with 1/2 threads): 4 KiB hashes at
    7.8/11 GB/s, 16 KiB at 11.8/17.8, 64 KiB at 13.5/20.9, 1 MiB at
    14.6/24.8. Past 64 KiB the speed barely grows (and is ten times what a
    disk reads) while every scattered change costs more bytes to send; 64 KiB
    is also the granularity of qemu dirty bitmaps and of qcow2 clusters, and
    its digests weigh 1/4096 of the disk.

    ``resume_offset`` is a value once passed to ``checkpoint``; nothing below
    it is read or written (checksum mode rounds it down to a block).
    ``target_is_blank`` says the target reads as zeroes already (a new sparse
    image): zero ranges then need no request at all. ``checkpoint_every``
    is how many bytes read for copying may pass between two checkpoints.
    ``flush`` False never flushes the target (and then ``checkpoint`` must
    not be given): for copies whose durability the caller handles, like
    ``cp`` or ``qemu-img convert`` do by default.
    """

    mode: SyncMode
    threads: int = 4
    chunk_size: int = 1 * MiB
    block_size: int = 64 * KiB
    resume_offset: int = 0
    target_is_blank: bool = False
    checkpoint_every: int = 64 * MiB
    flush: bool = True

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
    read from either disk to be hashed (checksum mode only; the target's
    part is counted where the target lives). ``blocks_changed`` counts
    differing blocks in checksum mode and chunks that wrote or zeroed
    something in the other modes. ``bytes_planned`` is what the plan said to
    copy (equal to ``bytes_read`` for a sync that finished).
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
    bytes_planned: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``mode`` as its string value)."""
        return {**asdict(self), "mode": str(self.mode)}


@runtime_checkable
class DigestSource(Protocol):
    """A target that hashes its own blocks where it lives (only digests travel)."""

    def block_digests(
        self, block_size: int, *, offset: int, length: int, threads: int
    ) -> tuple[Digests, int]:
        """The digests of ``[offset, offset + length)`` and the bytes read to make them.

        Same contract as :func:`siterecovery.disk.digest.block_digests`.
        """
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
    _check(src, dst, options, checkpoint)
    start = _start_offset(options)
    tally = Tally(start, progress, checkpoint, options.checkpoint_every, flush=options.flush)
    plan = _plan(src, dst, options, start, tally, cancelled)
    tally.add_total(plan.bytes_to_copy)
    items = planning.items(plan.extents, options.chunk_size)
    pipeline = Pipeline(src, dst, _stage(options), items, tally, cancelled)
    stats = pipeline.execute(what=f"{options.mode} sync")
    tally.save(dst, src.size)
    return SyncResult(
        mode=options.mode,
        bytes_read=stats.read,
        bytes_written=stats.written,
        bytes_zeroed=stats.zeroed,
        blocks_changed=stats.chunks if plan.blocks_changed is None else plan.blocks_changed,
        extents_planned=len(plan.extents),
        resumed_from=start,
        seconds=time.monotonic() - started,
        bytes_hashed=plan.bytes_hashed,
        bytes_planned=plan.bytes_to_copy,
    )


def _stage(options: SyncOptions) -> Stage:
    return Stage(
        readers=options.threads,
        writers=max(1, options.threads // 2),
        chunk_size=options.chunk_size,
        grain=options.block_size,
        target_is_blank=options.target_is_blank,
        early_writeback=options.flush,
    )


def _check(
    src: BlockDevice, dst: BlockDevice, options: SyncOptions, checkpoint: Checkpoint | None
) -> None:
    if dst.size < src.size:
        raise DiskError(
            detail=f"the target ({dst.size} bytes) is smaller than the source ({src.size} bytes)"
        )
    if checkpoint is not None and not options.flush:
        raise InvalidInput(field="flush", reason="checkpoints need flushes")


def _start_offset(options: SyncOptions) -> int:
    if options.mode is SyncMode.CHECKSUM:
        return options.resume_offset // options.block_size * options.block_size
    return options.resume_offset


def _plan(
    src: BlockDevice,
    dst: BlockDevice,
    options: SyncOptions,
    start: int,
    tally: Tally,
    cancelled: Cancelled | None,
) -> planning.Plan:
    if start >= src.size:
        return planning.Plan([])
    if options.mode is SyncMode.CHECKSUM:
        return _plan_checksum(src, dst, options, start, tally, cancelled)
    tracked = options.mode is SyncMode.TRACKED
    return planning.allocation_plan(src, start, tracked=tracked, skip_zero=options.target_is_blank)


def _plan_checksum(
    src: BlockDevice,
    dst: BlockDevice,
    options: SyncOptions,
    start: int,
    tally: Tally,
    cancelled: Cancelled | None,
) -> planning.Plan:
    """Hash both sides at once (holes by the zero digest, unread); plan the differing blocks."""
    bs, length = options.block_size, src.size - start
    remote = isinstance(dst, DigestSource)
    ours_plan = hash_plan(src, bs, start, length)
    theirs_plan = None if remote else hash_plan(dst, bs, start, length)
    tally.add_total(
        bytes_to_hash(src, bs, plan=ours_plan)
        + (0 if theirs_plan is None else bytes_to_hash(dst, bs, plan=theirs_plan))
    )
    before = tally.done
    hash_blocks = functools.partial(
        block_digests, block_size=bs, offset=start, length=length,
        threads=options.threads, on_read=tally.read, cancelled=cancelled,
    )  # fmt: skip
    theirs = _Background(
        lambda: _target_digests(dst, options, start, length, hash_blocks, theirs_plan)
    )
    try:
        ours = hash_blocks(src, plan=ours_plan)
        digests, hashed_remotely = theirs.result()
    except SyncCancelled:
        raise SyncCancelled(what="checksum sync", resume_offset=start) from None
    finally:
        theirs.wait()
    extents, changed = planning.diff(ours, digests, start, bs, src.size)
    hashed = tally.done - before + hashed_remotely
    return planning.Plan(extents, blocks_changed=changed, bytes_hashed=hashed)


def _target_digests(
    dst: BlockDevice,
    options: SyncOptions,
    start: int,
    length: int,
    hash_blocks: functools.partial[Digests],
    plan: list[Extent] | None,
) -> tuple[Digests, int]:
    """The target's digests and the bytes hashed where it lives (0 when counted here)."""
    if isinstance(dst, DigestSource):
        return dst.block_digests(
            options.block_size, offset=start, length=length, threads=options.threads
        )
    return hash_blocks(dst, plan=plan), 0


class _Background(Generic[T]):
    """Runs one function in a thread; :meth:`result` joins, then returns or raises."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sync-digests")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as e:
            self._error = e

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value
