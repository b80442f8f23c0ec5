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
import time
from typing import Protocol, runtime_checkable

from siterecovery.disk.base import BlockDevice, Extent
from siterecovery.disk.digest import Digests, block_digests, bytes_to_hash, hash_plan
from siterecovery.domain.errors import DiskError, InvalidInput, SyncCancelled
from siterecovery.replication import plan as planning
from siterecovery.replication.background import Background
from siterecovery.replication.options import SyncMode, SyncOptions, SyncResult
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
    theirs = Background(
        lambda: _target_digests(dst, options, start, length, hash_blocks, theirs_plan),
        name="sync-digests",
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
