"""Data movement of a failback: the disks of the VM running at one site are
brought onto the disks of the VM at the other site (original or alternate
location).

- :func:`delta_phase1`: the source keeps running; a point-in-time view of it is
  synced onto the target, sending only blocks that may differ: tracked (the
  source's bitmaps since the failover point ∪ the target's bitmap since the same
  point) when both sides kept change tracking, per-block checksums otherwise.
  A new bitmap on the source records what changes after the view.
- :func:`delta_phase2`: the source is stopped; only what its phase-1 bitmap
  recorded is sent (time follows that change, not the disk size), then both
  disks are digested (the integrity proof).
- :func:`full_download`: the source is stopped, the target gets new blank
  disks and every allocated block is copied (no checksums).

Every function is idempotent by ``tag`` and resumes from the offsets it
persisted in the item's ``tracking.resume``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from siterecovery.disk.base import BlockDevice, Extent
from siterecovery.disk.checkpoints import PointInTimeView, Tracker, freeze_together
from siterecovery.disk.digest import integrity_proof
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.wrappers import RateLimitedDevice
from siterecovery.domain.errors import DiskFull
from siterecovery.domain.model import Site, Vm
from siterecovery.providers.base import DiskAccess, Provider
from siterecovery.replication.extents import UnionDirtyDevice
from siterecovery.replication.resume import ResumeOffsets
from siterecovery.replication.sync import SyncMode, SyncOptions, sync
from siterecovery.services.context import Context

Progress = Callable[[int, int], None]
CHECKPOINT_EVERY = 8 << 20
PHASE2_GRANULARITY = 4096
"""Bytes per bit of the bitmap phase 1 starts: phase 2 sends what the guest
wrote after phase 1 at 4 KiB precision (a bitmap of 32 KiB per GiB)."""


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a failback: a VM at a site, and the provider that runs it."""

    site: Site
    vm: Vm
    provider: Provider

    @contextmanager
    def access(self) -> Iterator[DiskAccess]:
        with self.provider.disk_access(self.site, self.vm) as access:
            yield access

    def trackers(self, access: DiskAccess) -> dict[str, Tracker]:
        return {
            d.name: Tracker(access.qmp, access.nodes[d.name], access.work_dir, access.nbd_socket)
            for d in self.vm.disks
        }


@dataclass
class Movement:
    """Callbacks and identity of one data movement of a job."""

    ctx: Context
    item: str
    tag: str
    threads: int
    progress: Progress | None = None
    cancelled: Callable[[], bool] | None = None
    max_rate: int = 0
    """Bandwidth cap in bytes/s (the item's policy), 0 for none."""

    @property
    def offsets(self) -> ResumeOffsets:
        return ResumeOffsets(self.ctx.store, self.item, self.tag)


def delta_phase1(
    move: Movement, source: Side, target: Side, since_point: dict[str, Any]
) -> dict[str, Any]:
    """Phase 1 of a delta failback (source running). ``since_point`` names the
    source checkpoint taken at failover and the target's own, when known."""
    report: dict[str, Any] = {}
    with source.access() as src_access, target.access() as dst_access:
        dirty = _target_dirty(target, dst_access, since_point.get("target_checkpoint"), move.tag)
        sources = source.trackers(src_access)
        checkpoint = since_point.get("source_checkpoint")
        since = {n: _usable_since(t, checkpoint) for n, t in sources.items()}
        tracked = dirty is not None and all(s is not None for s in since.values())
        frozen = _freeze(move, sources, _since_if(tracked, since), PHASE2_GRANULARITY)
        with _writable(dst_access) as targets, _space(target):
            for disk in source.vm.disks:
                extra = dirty.get(disk.name, []) if dirty is not None else None
                view, dst = frozen.views[disk.name], targets[disk.name]
                report[disk.name] = _send(move, view, dst, disk.name, extra, frozen.resumed)
        frozen.release()
    return {"disks": report, "checkpoint": frozen.checkpoint, "older": frozen.older}


def _since_if(tracked: bool, since: dict[str, list[str] | None]) -> dict[str, list[str]]:
    """What each view reports changes since: every usable bitmap, or nothing
    at all (a checksum sync) unless every disk can be tracked."""
    return {name: (names or []) if tracked else [] for name, names in since.items()}


def delta_phase2(
    move: Movement, source: Side, target: Side, phase1: dict[str, Any]
) -> dict[str, Any]:
    """Phase 2 (source stopped by the caller): send what changed after phase 1.

    ``phase1`` is phase 1's result: its checkpoint and the bitmaps older than
    it; only the newer ones are read (phase 1's data is not sent again).
    """
    report: dict[str, Any] = {}
    with source.access() as src_access, target.access() as dst_access:
        sources = source.trackers(src_access)
        since = {n: _newer_than(t, phase1) for n, t in sources.items()}
        tracked = all(s is not None for s in since.values())
        frozen = _freeze(move, sources, _since_if(tracked, since))
        with _writable(dst_access) as targets, _space(target):
            for disk in source.vm.disks:
                view, dst = frozen.views[disk.name], targets[disk.name]
                extra: list[Extent] | None = [] if tracked else None
                report[disk.name] = _send(move, view, dst, disk.name, extra, frozen.resumed)
                report[disk.name].update(_proof(view, dst, disk.name))
        frozen.release()
    return {"disks": report, "checkpoint": frozen.checkpoint}


def full_download(move: Movement, source: Side, target: Side) -> dict[str, Any]:
    """Copy every allocated block of the stopped source onto new blank target disks."""
    report: dict[str, Any] = {}
    with source.access() as src_access, target.access() as dst_access:
        trackers = source.trackers(src_access)
        frozen = _freeze(move, trackers, {name: [] for name in trackers})
        with _writable(dst_access) as targets, _space(target):
            for disk in source.vm.disks:
                view, dst = frozen.views[disk.name], targets[disk.name]
                report[disk.name] = _send(
                    move, view, dst, disk.name, None, frozen.resumed, full=True
                )
                report[disk.name].update(_proof(view, dst, disk.name))
        frozen.release()
    return {"disks": report}


def _newer_than(tracker: Tracker, phase1: dict[str, Any]) -> list[str] | None:
    """The bitmaps started by phase 1's freeze or later, if all are consistent."""
    bitmaps = [b for b in tracker.bitmaps() if b.name not in set(phase1["older"])]
    names = [b.name for b in bitmaps]
    if phase1["checkpoint"] not in names or any(b.inconsistent for b in bitmaps):
        return None
    return names


def pending_bytes(source: Side, checkpoint: str) -> int:
    """Bytes the source's ``checkpoint`` bitmap marks dirty (phase-2 prediction)."""
    total = 0
    with source.access() as access:
        for tracker in source.trackers(access).values():
            total += sum(b.count for b in tracker.bitmaps() if b.name == checkpoint)
    return total


def _usable_since(tracker: Tracker, checkpoint: str | None) -> list[str] | None:
    """Every bitmap of ours when they are all consistent and include ``checkpoint``
    (their union then covers every write since it), else None."""
    bitmaps = tracker.bitmaps()
    names = [b.name for b in bitmaps]
    if checkpoint is None or checkpoint not in names or any(b.inconsistent for b in bitmaps):
        return None
    return names


def _target_dirty(
    target: Side, access: DiskAccess, checkpoint: str | None, tag: str
) -> dict[str, list[Extent]] | None:
    """Extents the target wrote since the failover point, or None if unknown."""
    if checkpoint is None:
        return None
    found: dict[str, list[Extent]] = {}
    reader = tag + "t"
    for name, tracker in target.trackers(access).items():
        tracker.cleanup_views()
        tracker.drop([reader])  # left by an interrupted attempt
        since = _usable_since(tracker, checkpoint)
        if since is None:
            return None
        view = tracker.freeze(reader, new_checkpoint=reader, since=since)
        with view.open() as device:
            found[name] = [e for e in device.dirty_extents() if e.dirty]
        view.release()
        tracker.drop([reader])
    return found


@dataclass(frozen=True, slots=True)
class Frozen:
    """Views of every disk, the checkpoint that records after them, and whether
    the saved offsets hold for them (``resumed``: the views were found from an
    earlier attempt, or show the very same data)."""

    views: dict[str, PointInTimeView]
    checkpoint: str
    resumed: bool
    older: list[str]

    def release(self) -> None:
        for view in self.views.values():
            view.release()


def _freeze(
    move: Movement,
    trackers: dict[str, Tracker],
    since: dict[str, list[str]],
    granularity: int | None = None,
) -> Frozen:
    """The views of ``move.tag``: an earlier attempt's when every disk still
    has one, else new ones. Saved offsets hold only for the data they were
    taken from: they are forgotten before a new freeze, unless the checkpoint
    the lost views started recorded nothing (a stopped VM whose transient
    daemon went away cleanly: its disks did not change)."""
    tag = move.tag
    found = {name: t.find_view(tag) for name, t in trackers.items()}
    names = sorted({b.name for t in trackers.values() for b in t.bitmaps()})
    previous = _recording(trackers, tag)
    if all(view is not None for view in found.values()):
        # An earlier attempt froze these views and started their checkpoint: it
        # records what came after them, so it is not one of the older bitmaps.
        views = {name: view for name, view in found.items() if view is not None}
        return Frozen(views, previous, True, [n for n in names if n != previous])
    unchanged = _unchanged(trackers, previous)
    if not unchanged:
        move.offsets.forget()
    for tracker in trackers.values():
        tracker.cleanup_views(keep_tags=(tag,))
    checkpoint = _free_name(tag, names)
    requests = [(t, since[n]) for n, t in trackers.items()]
    fresh = freeze_together(requests, tag, new_checkpoint=checkpoint, granularity=granularity)
    return Frozen(dict(zip(trackers, fresh, strict=True)), checkpoint, unchanged, names)


def _unchanged(trackers: dict[str, Tracker], checkpoint: str) -> bool:
    """Whether ``checkpoint`` records, consistent and empty, on every disk:
    nothing was written since the freeze that started it."""
    return all(
        any(b.name == checkpoint and b.recording and not b.inconsistent and b.count == 0
            for b in tracker.bitmaps())
        for tracker in trackers.values()
    )  # fmt: skip


def _free_name(tag: str, taken: list[str]) -> str:
    """``tag``, or ``tag`` with a suffix when an earlier attempt left that bitmap."""
    name, attempt = tag, 1
    while name in taken:
        name, attempt = f"{tag}r{attempt}", attempt + 1
    return name


def _recording(trackers: dict[str, Tracker], tag: str) -> str:
    """The checkpoint a found view's freeze started (the newest recording name
    of ``tag``: ``tag``, then ``tag``r1, r2…)."""
    names = {b.name for t in trackers.values() for b in t.bitmaps() if b.recording}
    attempts = {k: n for n in names if (k := _attempt(tag, n)) is not None}
    return attempts[max(attempts)] if attempts else tag


def _attempt(tag: str, name: str) -> int | None:
    """0 for ``tag``, k for ``tag``rk (see :func:`_free_name`), else None."""
    if name == tag:
        return 0
    suffix = name[len(tag) + 1 :]
    return int(suffix) if name.startswith(tag + "r") and suffix.isdigit() else None


@contextmanager
def _writable(access: DiskAccess) -> Iterator[dict[str, NbdDevice]]:
    with ExitStack() as stack:
        yield {
            disk: stack.enter_context(NbdDevice.connect(access.nbd_socket, node, writable=True))
            for disk, node in access.nodes.items()
        }


def _send(
    move: Movement,
    view: PointInTimeView,
    dst: BlockDevice,
    disk: str,
    extra_dirty: list[Extent] | None,
    resumed: bool,
    *,
    full: bool = False,
) -> dict[str, Any]:
    """Sync one disk: tracked (view bitmap ∪ ``extra_dirty``), checksum when
    ``extra_dirty`` is None and not ``full``, or full. ``resumed``: the view
    is an earlier attempt's, so the sync starts at its saved offset."""
    with view.open() as raw:
        src: BlockDevice = (
            RateLimitedDevice(raw, move.max_rate, interrupt=move.cancelled)
            if move.max_rate
            else raw
        )
        if full:
            mode = SyncMode.FULL
        elif extra_dirty is not None and view.has_bitmap:
            mode, src = SyncMode.TRACKED, UnionDirtyDevice(src, extra_dirty)
        else:
            mode = SyncMode.CHECKSUM
        result = sync(
            src,
            dst,
            SyncOptions(
                mode=mode,
                threads=move.threads,
                resume_offset=move.offsets.get(disk),
                target_is_blank=full,
                checkpoint_every=CHECKPOINT_EVERY,
            ),
            progress=move.progress,
            checkpoint=lambda offset: move.offsets.save(disk, offset),
            cancelled=move.cancelled,
        )
        dst.flush()
    return {**result.to_dict(), "mode": mode.value, "resumed": resumed}


@contextmanager
def _space(target: Side) -> Iterator[None]:
    """Re-raise DiskFull naming the target's site and the directory of its disks."""
    try:
        yield
    except DiskFull as exc:
        where = target.provider.disk_path(target.site, target.vm, target.vm.disks[0].name).parent
        free = shutil.disk_usage(where).free if where.is_dir() else None
        raise DiskFull(
            what=f"the failback of {target.vm.name}", where=str(where), site=target.site.name,
            free=free,
        ) from exc  # fmt: skip


def _proof(view: PointInTimeView, dst: BlockDevice, disk: str) -> dict[str, Any]:
    """Whole-disk digests of the stopped source and of the target after sync."""
    with view.open() as src:
        return integrity_proof(src, dst, disk)


def estimate(source: Side, target: Side, since_point: dict[str, Any], sync: str) -> tuple[int, str]:
    """Bytes a failback would move, and how the figure was found (for --dry-run).

    Tracked: the dirty counts of the bitmaps on both sides (an upper bound, as
    blocks both sides changed count twice). Otherwise every allocated byte of
    the source: all of it for a full download, at most that for checksums.
    """
    with source.access() as src_access:
        allocated = sum(_allocated(src_access, node) for node in src_access.nodes.values())
        counts = _tracked_count(source.trackers(src_access), since_point.get("source_checkpoint"))
    if sync == "full":
        return allocated, "every allocated byte of the source (full download)"
    if counts is not None:
        with target.access() as dst_access:
            theirs = _tracked_count(
                target.trackers(dst_access), since_point.get("target_checkpoint")
            )
        if theirs is not None:
            return (
                counts + theirs,
                "tracked: blocks changed on either side since the failover point",
            )
    return allocated, "at most the allocated bytes: per-block checksums find what differs"


def _allocated(access: DiskAccess, node: str) -> int:
    with NbdDevice.connect(access.nbd_socket, node) as device:
        return sum(e.length for e in device.extents() if not e.zero)


def _tracked_count(trackers: dict[str, Tracker], checkpoint: str | None) -> int | None:
    total = 0
    for tracker in trackers.values():
        names = _usable_since(tracker, checkpoint)
        if names is None:
            return None
        total += sum(b.count for b in tracker.bitmaps() if b.name in names)
    return total
