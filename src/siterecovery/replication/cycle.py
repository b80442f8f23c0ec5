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
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from siterecovery.disk.checkpoints import BitmapState, PointInTimeView, Tracker, freeze_together
from siterecovery.disk.digest import integrity_proof
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.disk.wrappers import CountingDevice, RateLimitedDevice
from siterecovery.domain.errors import BitmapInconsistent, DiskError, DiskFull
from siterecovery.domain.model import Item, PointType, RecoveryPoint, Site, Vm, VmPower, utcnow
from siterecovery.points.chain import ReplicaChain, merge_into_parent
from siterecovery.points.retention import points_to_drop
from siterecovery.providers.base import DiskAccess, GuestAgent, Provider
from siterecovery.replication.resume import ResumeOffsets
from siterecovery.replication.sync import SyncMode, SyncOptions, SyncResult, sync
from siterecovery.services.context import Context

CHECKPOINT_EVERY = 8 << 20  # bytes between persisted offsets of a resumable sync
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

    def to_dict(self) -> dict[str, Any]:
        return {"point": self.point.to_dict(), "disks": self.disks}


def new_tag() -> str:
    return "c" + uuid.uuid4().hex[:10]


def run_pass(ctx: Context, vm_name: str, options: PassOptions) -> PassReport:
    """Replicate ``vm_name`` once and seal a recovery point (see module doc)."""
    with ExitStack() as stack:
        run = PassRun.open(ctx, vm_name, options, stack)
        with quiesced([run.guest()]) as seqs:
            views = run.freeze()
        report = run.finish(views, seqs[0], utcnow())
    run.retain()
    return report


@contextmanager
def quiesced(guests: list[GuestAgent | None]) -> Iterator[list[int | None]]:
    """Quiesce every guest (None: no guest tools), in order; thaw them all on exit.

    Yields each guest's last acknowledged workload seq (None where no guest).
    A guest that fails to quiesce thaws the ones already paused and raises.
    """
    with ExitStack() as stack:
        seqs: list[int | None] = []
        for guest in guests:
            if guest is None:
                seqs.append(None)
                continue
            seqs.append(guest.quiesce(timeout=60.0))
            stack.callback(guest.thaw)
        yield seqs


@dataclass
class PassRun:
    """One VM's pass, split so that a replication group can freeze all its
    members at one instant: :meth:`open` (disk access), :meth:`freeze` (views
    and the new checkpoint), :meth:`finish` (send, seal, drop older bitmaps),
    :meth:`retain` (retention, after the disk access is closed)."""

    ctx: Context
    item: Item
    vm: Vm
    source_site: Site
    target_site: Site
    options: PassOptions
    seq: int
    access: DiskAccess
    started: float

    @classmethod
    def open(cls, ctx: Context, vm_name: str, options: PassOptions, stack: ExitStack) -> PassRun:
        item = ctx.store.get_item(vm=vm_name)
        source_site = ctx.store.get_site(name=item.active_site)
        target_site = ctx.store.get_site(name=item.standby_site)
        vm = ctx.store.get_vm(name=vm_name, site=item.active_site)
        _finish_pending_merges(ctx, vm_name)
        seq = int(ctx.store.get_tracking(vm=vm_name).get("next_seq", 1))
        access = stack.enter_context(ctx.provider(source_site).disk_access(source_site, vm))
        return cls(ctx, item, vm, source_site, target_site, options, seq, access, time.monotonic())

    def guest(self) -> GuestAgent | None:
        """The guest to quiesce for an app-consistent point (None: crash-consistent)."""
        if not self.options.app_consistent:
            return None
        return self.ctx.provider(self.source_site).guest(self.source_site, self.vm)

    def freeze(self) -> dict[str, Frozen]:
        return _freeze_disks(self._trackers(), self.options)

    def finish(
        self,
        views: dict[str, Frozen],
        workload_seq: int | None,
        moment: datetime,
        *,
        common: str | None = None,
        app_consistent: bool | None = None,
    ) -> PassReport:
        """Send every disk's changes, seal the point, then drop the older bitmaps."""
        target = self.ctx.provider(self.target_site)
        disks = {}
        for disk in self.vm.disks:
            chain = ReplicaChain(
                target.replica_dir(self.target_site, self.vm.name, disk.name), disk.size
            )
            what = f"the pass of '{self.vm.name}' (disk {disk.name})"
            with self._source_alive(), _space(chain, self.target_site, what):
                disks[disk.name] = _send_disk(
                    self.ctx, target, self.target_site, self.item, chain, self.seq,
                    views[disk.name], disk.name, self.options,
                )  # fmt: skip
        consistent = workload_seq is not None if app_consistent is None else app_consistent
        sealing = Sealing(moment, disks, workload_seq, consistent, common)
        point = _seal(
            self.ctx, self.item, self.vm, self.target_site, self.seq, sealing, self.options
        )
        for name, tracker in self._trackers().items():
            _drop_older_bitmaps(tracker, keep=self.options.tag)
            views[name].view.release()
        seconds = round(time.monotonic() - self.started, 3)
        return PassReport(point, {name: {**d, "seconds": seconds} for name, d in disks.items()})

    @contextmanager
    def _source_alive(self) -> Iterator[None]:
        """Say so when a disk error comes from the VM's daemon having gone away."""
        try:
            yield
        except DiskError as e:
            power = self.ctx.provider(self.source_site).power(self.source_site, self.vm)
            if not (self.access.running and power is VmPower.STOPPED):
                raise
            raise DiskError(
                detail=f"the qemu-storage-daemon serving '{self.vm.name}' at site "
                f"'{self.source_site.name}' exited during the pass ({e}); no point was sealed: "
                "start the VM again, its next pass compares checksums"
            ) from e

    def retain(self) -> list[str]:
        target = self.ctx.provider(self.target_site)
        return apply_retention(self.ctx, self.item, self.target_site, target)

    def _trackers(self) -> dict[str, Tracker]:
        access = self.access
        return {
            d.name: Tracker(access.qmp, access.nodes[d.name], access.work_dir, access.nbd_socket)
            for d in self.vm.disks
        }


@dataclass(frozen=True, slots=True)
class Frozen:
    """A disk's point-in-time view and the state of its change tracking."""

    view: PointInTimeView
    tracking: str


def _freeze_disks(trackers: dict[str, Tracker], options: PassOptions) -> dict[str, Frozen]:
    """Views of every disk at one instant (one QMP transaction for all of them)."""
    found = {name: tracker.find_view(options.tag) for name, tracker in trackers.items()}
    if all(view is not None for view in found.values()):
        return {name: Frozen(view, "resumed") for name, view in found.items() if view}
    reasons = {}
    requests = []
    for name, tracker in trackers.items():
        tracker.cleanup_views(keep_tags=(options.tag,))
        if options.initial:
            # A lost view of an initial sync (the VM restarted): start over; its
            # bitmap, kept by a clean stop, would clash with the new one.
            tracker.drop([options.tag])
        bitmaps = tracker.bitmaps()
        reasons[name] = tracking_state(options, bitmaps)
        since = [b.name for b in bitmaps] if reasons[name] == "bitmap" else []
        requests.append((tracker, since))
    views = freeze_together(requests, options.tag, new_checkpoint=options.tag)
    return {name: Frozen(view, reasons[name]) for name, view in zip(trackers, views, strict=True)}


def tracking_state(options: PassOptions, bitmaps: list[BitmapState]) -> str:
    """Why a pass can (``bitmap``) or cannot trust change tracking."""
    if options.initial:
        return "initial"
    if any(b.inconsistent for b in bitmaps):
        # The VM stopped uncleanly: its bitmaps may miss writes.
        return "inconsistent-bitmap"
    return "bitmap" if bitmaps else "no-bitmap"


def _send_disk(
    ctx: Context,
    target: Provider,
    target_site: Site,
    item: Item,
    chain: ReplicaChain,
    seq: int,
    frozen: Frozen,
    disk: str,
    options: PassOptions,
) -> dict[str, Any]:
    view = frozen.view
    mode = _mode(options, view, chain)
    # Offsets only hold for the very view they were taken from.
    resumed = options.initial and frozen.tracking == "resumed"
    offsets = ResumeOffsets(ctx.store, item.vm, options.tag)
    resume = offsets.get(disk) if resumed else 0
    if not resume:
        chain.discard_partials()
    partial = chain.begin(seq, backing=chain.head())
    run_dir = target.run_dir(target_site, f"writer-{item.vm}-{disk}")
    with _writer(run_dir, partial) as dst, view.open() as raw_src:
        src = CountingDevice(_throttled(raw_src, item.policy.max_rate, options.cancelled))
        result = sync(
            src,
            dst,
            SyncOptions(
                mode=mode,
                threads=item.policy.threads,
                resume_offset=resume,
                target_is_blank=chain.head() is None,
                checkpoint_every=CHECKPOINT_EVERY,
            ),
            progress=options.progress,
            checkpoint=lambda offset: offsets.save(disk, offset),
            cancelled=options.cancelled,
        )
        report = _disk_report(result, mode, src)
        if item.policy.verify_points or options.initial:
            report.update(integrity_proof(raw_src, dst, disk))
    return {**report, "tracking": frozen.tracking}


@contextmanager
def _space(chain: ReplicaChain, site: Site, what: str) -> Iterator[None]:
    """Re-raise DiskFull naming the site and the directory that is full, after
    removing the partial file: its space goes back and no point is sealed."""
    try:
        yield
    except DiskFull as e:
        chain.discard_partials()
        free = shutil.disk_usage(chain.directory).free if chain.directory.is_dir() else None
        raise DiskFull(what=what, where=str(chain.directory), site=site.name, free=free) from e


def _mode(options: PassOptions, view: PointInTimeView, chain: ReplicaChain) -> SyncMode:
    if chain.head() is None:
        return SyncMode.FULL
    if options.initial:
        # A chain exists but this is a new protection: only differing blocks move.
        return SyncMode.CHECKSUM
    # Slow path: no trustworthy bitmap (VM crash, lost tracking) -> checksums.
    return SyncMode.TRACKED if view.has_bitmap else SyncMode.CHECKSUM


def _throttled(
    device: NbdDevice, max_rate: int, cancelled: Callable[[], bool] | None = None
) -> Any:
    """The bandwidth cap; its waits end early when the pass is cancelled."""
    if max_rate <= 0:
        return device
    return RateLimitedDevice(device, max_rate, interrupt=cancelled)


def _disk_report(result: SyncResult, mode: SyncMode, counted: CountingDevice) -> dict[str, Any]:
    return {**result.to_dict(), "mode": mode.value, "source_bytes_read": counted.counts.bytes_read}


@contextmanager
def _writer(run_dir: Path, partial: Path) -> Iterator[NbdDevice]:
    stale = StorageDaemon.attach(run_dir)
    if stale is not None:
        stale.kill()
    daemon = StorageDaemon.start(run_dir, [DiskSpec(node="w0", path=partial)], detached=False)
    try:
        with NbdDevice.connect(daemon.nbd_socket, "w0", writable=True) as device:
            yield device
            device.flush()
    finally:
        daemon.stop()


@dataclass(frozen=True, slots=True)
class Sealing:
    """What a sealed point records besides its files."""

    moment: datetime
    disks: dict[str, dict[str, Any]]
    workload_seq: int | None
    app_consistent: bool
    common: str | None = None


def _seal(
    ctx: Context,
    item: Item,
    vm: Vm,
    site: Site,
    seq: int,
    sealing: Sealing,
    options: PassOptions,
) -> RecoveryPoint:
    target = ctx.provider(site)
    files = {}
    for disk in vm.disks:
        chain = ReplicaChain(target.replica_dir(site, item.vm, disk.name), disk.size)
        files[disk.name] = chain.seal(seq).name
    disks = sealing.disks
    point = RecoveryPoint(
        id=f"{item.vm}-{seq:06d}",
        vm=item.vm,
        site=site.name,
        seq=seq,
        time=sealing.moment,
        type=PointType.APP_CONSISTENT if sealing.app_consistent else PointType.CRASH_CONSISTENT,
        files=files,
        bytes=sum(int(d.get("bytes_written", 0)) for d in disks.values()),
        source_digests={n: d["source_digest"] for n, d in disks.items() if "source_digest" in d},
        workload_seq=sealing.workload_seq,
        common=sealing.common,
    )
    ctx.store.add_point(point=point)
    ctx.store.merge_tracking(
        vm=item.vm,
        next_seq=seq + 1,
        resume=None,
        last_pass=disks,
        last_checkpoint={"point": point.id, "tag": options.tag, "site": item.active_site},
    )
    return point


def _drop_older_bitmaps(tracker: Tracker, *, keep: str) -> None:
    tracker.drop([b.name for b in tracker.bitmaps() if b.name != keep])


def apply_retention(ctx: Context, item: Item, site: Site, provider: Provider) -> list[str]:
    """Thin the item's points by its policy; returns the ids removed."""
    points = ctx.store.list_points(vm=item.vm, site=site.name)
    pinned = set(ctx.store.get_tracking(vm=item.vm).get("pinned") or [])
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
        _drop_point(ctx, item.vm, site, provider, point_id)
    return doomed


def _drop_point(ctx: Context, vm: str, site: Site, provider: Provider, point_id: str) -> None:
    """Delete one point (never the newest) by folding its child's file into its own."""
    current = ctx.store.list_points(vm=vm, site=site.name)
    index = next(i for i, p in enumerate(current) if p.id == point_id)
    point, child = current[index], current[index + 1]
    grandchild = current[index + 2] if index + 2 < len(current) else None
    merges = [
        {
            "dir": str(provider.replica_dir(site, vm, disk)),
            "child": child.files[disk],
            "parent": point.files[disk],
            "grandchild": grandchild.files[disk] if grandchild else None,
        }
        for disk in point.files
    ]
    # Record the intent first: a crash in the middle is finished on the next pass.
    ctx.store.merge_tracking(vm=vm, pending_merges=merges)
    ctx.store.delete_points(ids=[point.id])
    ctx.store.update_point_files(point_id=child.id, files=dict(point.files))
    _finish_pending_merges(ctx, vm)


def _finish_pending_merges(ctx: Context, vm: str) -> None:
    for merge in ctx.store.get_tracking(vm=vm).get("pending_merges") or []:
        directory = Path(merge["dir"])
        grandchild = directory / merge["grandchild"] if merge["grandchild"] else None
        merge_into_parent(directory / merge["child"], directory / merge["parent"], grandchild)
    ctx.store.merge_tracking(vm=vm, pending_merges=[])


__all__ = [
    "BitmapInconsistent", "PassOptions", "PassReport", "PassRun", "new_tag", "quiesced", "run_pass",
]  # fmt: skip
