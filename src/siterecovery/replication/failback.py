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
persisted in the item's tracking (``ItemTracking.resume``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import DiskFull
from siterecovery.domain.model import Vm
from siterecovery.domain.tracking import FailoverState
from siterecovery.replication.resume import ResumeOffsets
from siterecovery.replication.wire_policy import transfer_of
from siterecovery.sites.base import (
    Extents,
    FrozenView,
    Receipt,
    Since,
    SiteAgent,
    Transfer,
    end_after_failure,
)

Progress = Callable[[int, int], None]
PHASE2_GRANULARITY = 4096
"""Bytes per bit of the bitmap phase 1 starts: phase 2 sends what the guest
wrote after phase 1 at 4 KiB precision (a bitmap of 32 KiB per GiB)."""


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a failback: a VM, and the site that runs it."""

    vm: Vm
    site: SiteAgent


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
    source_site: str | None = None
    """The site sending the disks: its cap applies too (None: none)."""

    @property
    def offsets(self) -> ResumeOffsets:
        return ResumeOffsets(self.ctx.store, self.item, self.tag)

    def transfer(self, *, verify: bool) -> Transfer:
        """The item's wire policy (compression, key), its cap and the sending site's."""
        policy = self.ctx.store.get_item(vm=self.item).policy
        site = self.source_site
        return transfer_of(
            self.ctx, policy, threads=self.threads, max_rate=self.max_rate, verify=verify,
            site_max_rate=0 if site is None else self.ctx.store.get_site(name=site).max_rate,
        )  # fmt: skip


def delta_phase1(
    move: Movement, source: Side, target: Side, since_point: dict[str, Any]
) -> dict[str, Any]:
    """Phase 1 of a delta failback (source running). ``since_point`` names the
    source checkpoint taken at failover and the target's own, when known: with
    both, the sync is tracked (the source's bitmaps since the point ∪ what the
    target wrote since its own); otherwise per-block checksums."""
    theirs = since_point.get("target_checkpoint")
    dirty = None if theirs is None else target.site.written_since(target.vm, theirs, move.tag)
    mine = since_point.get("source_checkpoint") if dirty is not None else None
    with _frozen(move, source, Since(mine), PHASE2_GRANULARITY) as frozen:
        mode = "tracked" if frozen.tracked else "checksum"
        report = _send_all(move, source, target, frozen, mode, dirty or {}, verify=False,
                           blank=False)  # fmt: skip
    return {"disks": report, "checkpoint": frozen.checkpoint, "older": frozen.older}


def delta_phase2(
    move: Movement, source: Side, target: Side, phase1: dict[str, Any]
) -> dict[str, Any]:
    """Phase 2 (source stopped by the caller): send what changed after phase 1,
    then both disks are digested where they are (the integrity proof).

    ``phase1`` is phase 1's result: its checkpoint and the bitmaps older than
    it; only the newer ones are read (phase 1's data is not sent again).
    """
    since = Since(phase1["checkpoint"], tuple(phase1["older"]))
    with _frozen(move, source, since) as frozen:
        mode = "tracked" if frozen.tracked else "checksum"
        report = _send_all(move, source, target, frozen, mode, {}, verify=True, blank=False)
    return {"disks": report, "checkpoint": frozen.checkpoint}


def full_download(move: Movement, source: Side, target: Side) -> dict[str, Any]:
    """Copy every allocated block of the stopped source onto new blank target disks."""
    with _frozen(move, source, Since()) as frozen:
        report = _send_all(move, source, target, frozen, "full", {}, verify=True, blank=True)
    return {"disks": report}


def pending_bytes(source: Side, checkpoint: str) -> int:
    """Bytes the source's ``checkpoint`` bitmap marks dirty (phase-2 prediction)."""
    measured = source.site.measure(source.vm, since=None)
    return int(measured["bitmaps"].get(checkpoint, 0))


@contextmanager
def _frozen(
    move: Movement, source: Side, since: Since, granularity: int | None = None
) -> Iterator[FrozenView]:
    """The source's views of ``move.tag``, its session closed on the way out:
    the views released when the movement is done, kept for a retry to resume
    when it failed. Saved offsets are forgotten unless they still hold for the
    views (see ``SiteAgent.freeze_view``)."""
    frozen = source.site.freeze_view(source.vm, move.tag, since=since, granularity=granularity)
    try:
        if not frozen.resumed:
            move.offsets.forget()
        yield frozen
    except BaseException:
        source.site.release(source.vm, move.tag, drop_older=False)
        raise
    source.site.release(source.vm, move.tag, drop_older=False, views=True)


def _send_all(
    move: Movement,
    source: Side,
    target: Side,
    frozen: FrozenView,
    mode: str,
    dirty: dict[str, Extents],
    *,
    verify: bool,
    blank: bool,
) -> dict[str, Any]:
    """Send every disk of the source's views onto the target VM's own disks,
    agent to agent: each resumes at its saved offset, and persists new ones."""
    report: dict[str, Any] = {}
    transfer = move.transfer(verify=verify)
    with _space(target), _receipts(target, blank=blank, transfer=transfer) as receipts:
        for disk in source.vm.disks:
            name = disk.name

            def saved(offset: int, disk: str = name) -> None:
                move.offsets.save(disk, offset)

            sent = source.site.send_disk(
                source.vm, name, move.tag, receipts[name], transfer,
                initial=False, resume=move.offsets.get(name), mode=mode,
                extra_dirty=dirty.get(name, []), progress=move.progress, checkpoint=saved,
                cancelled=move.cancelled,
            )  # fmt: skip
            report[name] = {**sent, "resumed": frozen.resumed}
    return report


@contextmanager
def _receipts(target: Side, *, blank: bool, transfer: Transfer) -> Iterator[dict[str, Receipt]]:
    receipts = target.site.receive_disks(target.vm, blank=blank, transfer=transfer)
    try:
        yield receipts
    except BaseException:
        for receipt in receipts.values():
            end_after_failure(target.site, receipt, keep=True)
        raise
    for receipt in receipts.values():
        target.site.end_receive(receipt, keep=True)


@contextmanager
def _space(target: Side) -> Iterator[None]:
    """Re-raise DiskFull naming the target's site and what it has left."""
    try:
        yield
    except DiskFull as exc:
        raise DiskFull(
            what=f"the failback of {target.vm.name}", where=str(exc.fields.get("where", "?")),
            site=target.site.name, free=target.site.space_free(),
        ) from exc  # fmt: skip


def estimate(
    source: Side, target: Side, since_point: FailoverState | None, sync: str
) -> tuple[int, str]:
    """Bytes a failback would move, and how the figure was found (for --dry-run).

    ``since_point`` is the item's last failover (its checkpoints on both sides).
    Tracked: the dirty counts of the bitmaps on both sides (an upper bound, as
    blocks both sides changed count twice). Otherwise every allocated byte of
    the source: all of it for a full download, at most that for checksums.
    """
    ours = since_point.source_checkpoint if since_point else None
    theirs = since_point.target_checkpoint if since_point else None
    mine = source.site.measure(source.vm, since=ours)
    allocated = int(mine["allocated"])
    if sync == "full":
        return allocated, "every allocated byte of the source (full download)"
    if mine["since"] is not None:
        other = target.site.measure(target.vm, since=theirs)
        if other["since"] is not None:
            return (
                int(mine["since"]) + int(other["since"]),
                "tracked: blocks changed on either side since the failover point",
            )
    return allocated, "at most the allocated bytes: per-block checksums find what differs"
