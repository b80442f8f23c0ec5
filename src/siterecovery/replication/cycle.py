"""One replication pass: freeze the source, send what changed, seal a recovery point.

The same pass serves the initial sync of ``protect`` (mode ``full`` onto a blank
chain) and every later cycle (mode ``tracked`` from the dirty bitmaps, or
``checksum`` when change tracking cannot be trusted). Its order makes it safe to
interrupt anywhere and simply run again:

1. quiesce the guest (app-consistent points only) and, per disk, atomically add
   a new recording bitmap, freeze the older ones and open a point-in-time view;
   thaw at once;
2. write the changes into ``pNNNNNN.qcow2.partial`` (an overlay on the newest
   sealed point) through a private qemu-storage-daemon; the initial sync
   persists its offset so a restarted job resumes, not restarts;
3. flush, rename the partial to its sealed name, record the point in the vault;
4. only then drop the bitmaps older than the new one and release the views.

A crash before (3) leaves the old bitmaps in place, so the next pass reads the
union of every bitmap present: nothing written by the guest is ever skipped.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import BitmapInconsistent, DiskFull, SiteRecoveryError
from siterecovery.domain.model import Item, PointType, RecoveryPoint, Site, Vm, utcnow
from siterecovery.domain.tracking import LastCheckpoint, PendingMerge
from siterecovery.points.retention import points_to_drop
from siterecovery.replication.resume import ResumeOffsets
from siterecovery.replication.wire_policy import transfer_of
from siterecovery.sites.base import NOT_ASKED, FrozenDisks, SiteAgent, Transfer, end_after_failure

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class PassOptions:
    """How one pass runs. ``tag`` names its views and bitmap (unique per attempt,
    except a job's initial sync, which keeps the job id so it can resume)."""

    tag: str
    initial: bool = False
    app_consistent: bool = False
    progress: Progress | None = None
    cancelled: Callable[[], bool] | None = None


@dataclass
class PassReport:
    point: RecoveryPoint
    disks: dict[str, dict[str, Any]] = field(default_factory=dict)
    quiesce: str = NOT_ASKED
    """Whether the guest quiesced, or why not (``sites.base``: ``quiesced``,
    ``not-asked``, ``no-guest-agent``, ``freeze-failed: WHY``)."""

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point.to_dict(), "disks": self.disks, "quiesce": self.quiesce}


def new_tag() -> str:
    return "c" + uuid.uuid4().hex[:10]


def run_pass(ctx: Context, vm_name: str, options: PassOptions) -> PassReport:
    """Replicate ``vm_name`` once and seal a recovery point (see module doc)."""
    run = PassRun.open(ctx, vm_name, options)
    with run.held():
        frozen = run.source.freeze(
            [run.vm], options.tag, initial=options.initial, quiesce=options.app_consistent
        )
        report = run.finish(frozen, utcnow())
    run.retain()
    return report


@dataclass
class PassRun:
    """One VM's pass, split so that a replication group can freeze all its
    members at one instant: :meth:`open` (the two sites), the source's
    ``freeze`` (views and the new checkpoint, at the source site),
    :meth:`finish` (each disk sent from the source site to the target site,
    sealed there, the point recorded, then the older checkpoints dropped),
    :meth:`retain` (retention). The engine moves no byte: it hands the target's
    receipt to the source and records what comes back."""

    ctx: Context
    item: Item
    vm: Vm
    source_site: Site
    target_site: Site
    source: SiteAgent
    target: SiteAgent
    options: PassOptions
    seq: int
    started: float

    @classmethod
    def open(cls, ctx: Context, vm_name: str, options: PassOptions) -> PassRun:
        item = ctx.store.get_item(vm=vm_name)
        source_site = ctx.store.get_site(name=item.active_site)
        target_site = ctx.store.get_site(name=item.standby_site)
        vm = ctx.store.get_vm(name=vm_name, site=item.active_site)
        _finish_pending_merges(ctx, vm_name)
        seq = ctx.store.next_point_seq(vm=vm_name)
        return cls(
            ctx, item, vm, source_site, target_site, ctx.site(source_site),
            ctx.site(target_site), options, seq, time.monotonic(),
        )  # fmt: skip

    @contextmanager
    def held(self) -> Iterator[None]:
        """On a failure, close the source's disk access but keep its views and
        checkpoints: the next pass resumes the view (initial sync) or reads
        the union of every checkpoint present."""
        try:
            yield
        except BaseException:
            try:
                self.source.release(self.vm, self.options.tag, drop_older=False)
            except SiteRecoveryError as e:  # the error reported is the one that ended the pass
                log.warning("could not release %s at site %s after a failed pass: %s",
                            self.vm.name, self.source.name, e)  # fmt: skip
            raise

    def finish(
        self,
        frozen: FrozenDisks,
        moment: datetime,
        *,
        common: str | None = None,
        app_consistent: bool | None = None,
        quiesce: str | None = None,
    ) -> PassReport:
        """Send every disk's changes, seal the point, then drop the older bitmaps.
        A group's common point says itself whether it is ``app_consistent``
        (all members quiesced), and ``quiesce`` why a member's is not."""
        tracking = frozen.tracking[self.vm.name]
        workload_seq = frozen.seqs.get(self.vm.name)
        quiesce = quiesce or frozen.quiesce.get(self.vm.name, NOT_ASKED)
        disks = {d.name: self._send(d.name, d.size, tracking[d.name]) for d in self.vm.disks}
        consistent = app_consistent
        if consistent is None:
            consistent = frozen.app_consistent(self.vm.name)
        sealing = Sealing(moment, disks, workload_seq, consistent, quiesce, common)
        point = _seal(self.ctx, self.item, self.vm, self.target, self.seq, sealing, self.options)
        self.source.release(self.vm, self.options.tag, drop_older=True)
        seconds = round(time.monotonic() - self.started, 3)
        return PassReport(
            point, {name: {**d, "seconds": seconds} for name, d in disks.items()}, quiesce
        )

    def retain(self) -> list[str]:
        return apply_retention(self.ctx, self.item, self.target_site)

    def _send(self, disk: str, size: int, tracking: str) -> dict[str, Any]:
        options = self.options
        # Offsets only hold for the very view they were taken from.
        resumed = options.initial and tracking == "resumed"
        offsets = ResumeOffsets(self.ctx.store, self.item.vm, options.tag)
        resume = offsets.get(disk) if resumed else 0
        transfer = self._transfer()
        receipt = self.target.receive_point(
            self.item.vm, disk, self.seq, size, resume=bool(resume), transfer=transfer
        )
        what = f"the pass of '{self.vm.name}' (disk {disk})"
        try:
            report = self.source.send_disk(
                self.vm, disk, options.tag, receipt, transfer, initial=options.initial,
                resume=resume, progress=options.progress,
                checkpoint=lambda offset: offsets.save(disk, offset), cancelled=options.cancelled,
            )  # fmt: skip
        except DiskFull as e:
            # Its space goes back and no point is sealed.
            end_after_failure(self.target, receipt, keep=False)
            where = self.target.location(self.item.vm, disk)
            free = self.target.space_free()
            raise DiskFull(what=what, where=where, site=self.target_site.name, free=free) from e
        except BaseException:
            end_after_failure(self.target, receipt, keep=True)
            raise
        self.target.end_receive(receipt, keep=True)
        return {**report, "tracking": tracking}

    def _transfer(self) -> Transfer:
        """The item's wire policy, the source site's cap and the key's material."""
        policy = self.item.policy
        return transfer_of(
            self.ctx, policy, threads=policy.threads, max_rate=policy.max_rate,
            site_max_rate=self.source_site.max_rate,
            verify=policy.verify_points or self.options.initial,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Sealing:
    """What a sealed point records besides its files."""

    moment: datetime
    disks: dict[str, dict[str, Any]]
    workload_seq: int | None
    app_consistent: bool
    quiesce: str
    common: str | None = None


def _seal(
    ctx: Context,
    item: Item,
    vm: Vm,
    target: SiteAgent,
    seq: int,
    sealing: Sealing,
    options: PassOptions,
) -> RecoveryPoint:
    files = target.seal(item.vm, seq, [d.name for d in vm.disks])
    disks = sealing.disks
    point = RecoveryPoint(
        id=f"{item.vm}-{seq:06d}",
        vm=item.vm,
        site=target.name,
        seq=seq,
        time=sealing.moment,
        type=PointType.APP_CONSISTENT if sealing.app_consistent else PointType.CRASH_CONSISTENT,
        files=files,
        bytes=sum(int(d.get("bytes_written", 0)) for d in disks.values()),
        source_digests={n: d["source_digest"] for n, d in disks.items() if "source_digest" in d},
        workload_seq=sealing.workload_seq,
        common=sealing.common,
    )
    last = LastCheckpoint(point=point.id, tag=options.tag, site=item.active_site)
    return ctx.store.add_point(
        point=point,
        tracking=lambda t: replace(
            t,
            next_seq=seq + 1,
            resume=None,
            last_pass=disks,
            last_checkpoint=last,
            last_quiesce=sealing.quiesce,
        ),
    )


def apply_retention(ctx: Context, item: Item, site: Site) -> list[str]:
    """Thin the item's points by its policy; returns the ids removed."""
    points = ctx.store.list_points(vm=item.vm, site=site.name)
    pinned = set(ctx.store.item_tracking(vm=item.vm).pinned)
    # A group member keeps its newest common point: the group fails over to it.
    pinned.update([p.id for p in points if p.common][-1:])
    following = {p.id: n.id for p, n in itertools.pairwise(points)}
    doomed = [
        p.id
        for p in points_to_drop(points, now=utcnow(), retention=item.policy.retention)
        # A pinned point (a drill runs on it) keeps its file and its child's.
        if p.id not in pinned and following.get(p.id) not in pinned
    ]
    for point_id in doomed:
        _drop_point(ctx, item.vm, site, point_id)
    return doomed


def _drop_point(ctx: Context, vm: str, site: Site, point_id: str) -> None:
    """Delete one point (never the newest) by folding its child's file into its own."""
    current = ctx.store.list_points(vm=vm, site=site.name)
    index = next(i for i, p in enumerate(current) if p.id == point_id)
    point, child = current[index], current[index + 1]
    grandchild = current[index + 2] if index + 2 < len(current) else None
    merges = tuple(
        PendingMerge(
            site=site.name,
            disk=disk,
            child=child.files[disk],
            parent=point.files[disk],
            grandchild=grandchild.files[disk] if grandchild else None,
        )
        for disk in point.files
    )
    # Record the intent first: a crash in the middle is finished on the next pass.
    ctx.store.update_item_tracking(vm=vm, change=lambda t: replace(t, pending_merges=merges))
    ctx.store.delete_points(ids=[point.id])
    ctx.store.update_point_files(point_id=child.id, files=dict(point.files))
    _finish_pending_merges(ctx, vm)


def _finish_pending_merges(ctx: Context, vm: str) -> None:
    for merge in ctx.store.item_tracking(vm=vm).pending_merges:
        site = merge.site or _site_of(ctx, vm)  # None: recorded before sites were agents
        ctx.site(site).merge(
            vm, merge.disk, child=merge.child, parent=merge.parent, grandchild=merge.grandchild
        )
    ctx.store.update_item_tracking(vm=vm, change=lambda t: replace(t, pending_merges=()))


def _site_of(ctx: Context, vm: str) -> str:
    return ctx.store.get_item(vm=vm).standby_site


__all__ = ["BitmapInconsistent", "PassOptions", "PassReport", "PassRun", "new_tag", "run_pass"]
