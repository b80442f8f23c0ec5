"""Protection of VMs: protect, disable, items with health, recovery points, checks."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from siterecovery.disk import qemu_img
from siterecovery.disk.base import BlockDevice
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.domain.errors import (
    AlreadyProtected,
    DrillActive,
    InvalidInput,
    PointNotFound,
    SameSite,
    VmCopyAtTarget,
)
from siterecovery.domain.lifecycle import ALLOWED, ItemState, Operation, require
from siterecovery.domain.model import (
    Health,
    Item,
    Policy,
    RecoveryPoint,
    Site,
    Vm,
    utcnow,
)
from siterecovery.domain.values import check_positive, parse_duration, parse_size
from siterecovery.services import ownership
from siterecovery.services.context import Context
from siterecovery.store.owner_repo import is_job

Submit = Callable[..., Any]

MIN_INTERVAL = 1.0


def make_policy(
    *,
    interval: str | float = "30s",
    app_consistent_every: int = 0,
    retention: str | float = "24h",
    threads: int = 4,
    max_rate: str | int = 0,
    verify_points: bool = False,
) -> Policy:
    """A validated policy (every field checked, InvalidInput names the bad one)."""
    seconds = parse_duration("interval", interval, minimum=MIN_INTERVAL)
    keep = parse_duration("retention", retention, minimum=seconds)
    if app_consistent_every < 0:
        raise InvalidInput(field="app-consistent-every", reason="must be 0 (never) or more")
    rate = parse_size("max-rate", max_rate, minimum=0) if max_rate not in (0, "0") else 0
    return Policy(
        interval=seconds,
        app_consistent_every=app_consistent_every,
        retention=keep,
        threads=check_positive("threads", threads, maximum=64),
        max_rate=rate,
        verify_points=verify_points,
    )


def protect(ctx: Context, *, vm: str, to: str, policy: Policy, submit: Submit) -> dict[str, Any]:
    """Start protecting ``vm`` toward site ``to``; returns the enable job."""
    target = ctx.store.get_site(name=to)
    existing = ctx.store.find_item(vm=vm)
    if existing is not None and existing.state is not ItemState.DISABLED:
        raise AlreadyProtected(
            vm=vm,
            state=existing.state.value,
            source=existing.active_site,
            target=existing.standby_site,
        )
    # A disabled item's VM runs where it last ran (its other copy may linger).
    source_vm = ctx.store.get_vm(name=vm, site=existing.active_site if existing else None)
    if target.name == source_vm.site:
        raise SameSite(vm=vm, site=source_vm.site)
    if ctx.store.find_vms(name=vm, site=target.name):
        raise VmCopyAtTarget(vm=vm, site=target.name)
    item = Item(
        vm=vm,
        active_site=source_vm.site,
        standby_site=target.name,
        state=ItemState.ENABLING,
        policy=policy,
        created=utcnow(),
    )
    from siterecovery.jobs.runtime import new_job_id
    from siterecovery.jobs.workflows import protect_workflow

    job_id = new_job_id()
    if existing is None:
        ctx.store.add_item(item=item, owner=job_id)  # owned from its first instant
    else:
        require(existing.state, Operation.PROTECT, vm=vm)
        ownership.take(ctx, vm, job_id, preempt=False)
        now = ctx.store.get_item(vm=vm)
        if now.state is not ItemState.DISABLED:  # another protect won the race
            ownership.release(ctx, vm, job_id)
            raise AlreadyProtected(
                vm=vm, state=now.state.value, source=now.active_site, target=now.standby_site
            )
        ctx.store.update_item(
            vm=vm,
            active_site=item.active_site,
            standby_site=item.standby_site,
            state=item.state,
            policy=policy,
            last_error=None,
        )
    try:
        _remember_origin(ctx, item, source_vm)
        job = submit(protect_workflow, kind="protect", vm=vm, params={"vm": vm}, job_id=job_id)
    except BaseException:
        ctx.store.update_item(vm=vm, state=ItemState.DISABLED)
        ownership.release(ctx, vm, job_id)
        raise
    return {"job": job.id, "item": item_view(ctx, ctx.store.get_item(vm=vm))}


def _remember_origin(ctx: Context, item: Item, vm: Vm) -> None:
    """Where protection began: failing over toward that site is a failback."""
    host = ctx.store.get_host(name=vm.host)
    tracking = ctx.store.get_tracking(vm=item.vm)
    hosts = {**(tracking.get("hosts") or {}), vm.site: vm.host}
    kinds = {**(tracking.get("kinds") or {}), vm.site: host.kind}
    home = tracking.get("home") or vm.site
    ctx.store.merge_tracking(vm=item.vm, home=home, hosts=hosts, kinds=kinds)


def disable(ctx: Context, *, vm: str) -> dict[str, Any]:
    """Stop protecting ``vm``: replication stops and its recovery points are deleted.

    Refused (VM_BUSY naming the job, nothing changed) while a job owns the item;
    a replication pass is stopped at its next chunk. Replica files that a VM's
    disks are backed by (a failed-over VM on a point) are kept: only what no
    disk needs is deleted.
    """
    require(ctx.store.get_item(vm=vm).state, Operation.DISABLE, vm=vm)
    owner = ownership.operation_owner("disable")
    ownership.take(ctx, vm, owner)
    try:
        item = ctx.store.get_item(vm=vm)
        require(item.state, Operation.DISABLE, vm=vm)
        drill = ctx.store.get_tracking(vm=vm).get("drill")
        if drill:
            raise DrillActive(vm=vm, site=drill["site"])
        ctx.store.update_item(vm=vm, state=ItemState.DISABLED)
        kept = _delete_replicas(ctx, item)
        ctx.store.delete_points(ids=[p.id for p in ctx.store.list_points(vm=vm)])
        ctx.store.merge_tracking(vm=vm, next_seq=1, resume=None, pending_merges=[])
    finally:
        ownership.release(ctx, vm, owner)
    return {**item_view(ctx, ctx.store.get_item(vm=vm)), "kept_replica_files": kept}


def _delete_replicas(ctx: Context, item: Item) -> list[str]:
    """Delete the item's replica chains at its standby site, except every file a
    VM disk at that site is backed by. Returns the files kept."""
    site = ctx.store.get_site(name=item.standby_site)
    provider = ctx.provider(site)
    needed = _backing_files(ctx, site, item.vm)
    kept: list[str] = []
    disks = {d.name for v in ctx.store.find_vms(name=item.vm) for d in v.disks}
    for disk in sorted(disks):
        chain = provider.replica_dir(site, item.vm, disk)
        if not chain.is_dir():
            continue
        keep = [str(p) for p in sorted(chain.iterdir()) if p.resolve() in needed]
        if not keep:
            shutil.rmtree(chain, ignore_errors=True)
            continue
        for path in chain.iterdir():
            if str(path) not in keep:
                path.unlink(missing_ok=True)
        kept.extend(keep)
    return kept


def _backing_files(ctx: Context, site: Site, vm: str) -> set[Path]:
    """Every image the disks of ``vm`` (and its drill copy) at ``site`` read through."""
    provider = ctx.provider(site)
    needed: set[Path] = set()
    for name in (vm, f"{vm}-test"):
        for found in ctx.store.find_vms(name=name, site=site.name):
            for disk in found.disks:
                path = provider.disk_path(site, found, disk.name)
                if path.exists():
                    needed.update(p.resolve() for p in qemu_img.backing_chain(path)[1:])
    return needed


def health(item: Item, latest: RecoveryPoint | None) -> tuple[Health, float | None]:
    """Health and RPO (seconds since the latest point) of an item.

    Protected items are healthy while the RPO stays within two intervals (plus
    30 s of slack), in warning up to six, critical beyond or with no point. A
    failed last pass makes a healthy item a warning. Items in other states
    have no health unless their last operation failed (critical).
    """
    rpo = (utcnow() - latest.time).total_seconds() if latest else None
    if item.state is not ItemState.PROTECTED:
        failed = item.last_error and item.state is not ItemState.DISABLED
        return (Health.CRITICAL if failed else Health.NONE), rpo
    if rpo is None or rpo > 6 * item.policy.interval + 60:
        return Health.CRITICAL, rpo
    if item.last_error or rpo > 2 * item.policy.interval + 30:
        return Health.WARNING, rpo
    return Health.HEALTHY, rpo


def item_view(ctx: Context, item: Item) -> dict[str, Any]:
    points = ctx.store.list_points(vm=item.vm, site=item.standby_site)
    latest = points[-1] if points else None
    app = [p for p in points if p.type.value == "app-consistent"]
    state, rpo = health(item, latest)
    tracking = ctx.store.get_tracking(vm=item.vm)
    return {
        **item.to_dict(),
        "health": state.value,
        "rpo_seconds": round(rpo, 3) if rpo is not None else None,
        "points": len(points),
        "latest_point": latest.to_dict() if latest else None,
        "latest_app_consistent_point": app[-1].to_dict() if app else None,
        "last_pass": tracking.get("last_pass"),
        "home_site": tracking.get("home"),
        "busy_job": _job_owner(ctx, item.vm),
        "failover": tracking.get("failover"),
        "drill": tracking.get("drill"),
        "allowed_operations": sorted(op.value for op in _allowed(item)),
    }


def _job_owner(ctx: Context, vm: str) -> str | None:
    """The job that owns the item, if one does (passes come and go: not shown)."""
    owner, _claim = ctx.store.item_owner(vm=vm)
    return owner if owner and is_job(owner) else None


def _allowed(item: Item) -> set[Operation]:
    return set(ALLOWED[item.state]) - {Operation.REPLICATE}


def list_items(ctx: Context) -> list[dict[str, Any]]:
    return [item_view(ctx, item) for item in ctx.store.list_items()]


def show_item(ctx: Context, *, vm: str) -> dict[str, Any]:
    return item_view(ctx, ctx.store.get_item(vm=vm))


def list_points(ctx: Context, *, vm: str) -> list[dict[str, Any]]:
    item = ctx.store.get_item(vm=vm)
    return [p.to_dict() for p in ctx.store.list_points(vm=vm, site=item.standby_site)]


def find_point(ctx: Context, *, vm: str, point_id: str) -> RecoveryPoint:
    for point in ctx.store.list_points(vm=vm):
        if point.id == point_id:
            return point
    raise PointNotFound(name=point_id, vm=vm)


def update_policy(ctx: Context, *, vm: str, **changes: Any) -> dict[str, Any]:
    item = ctx.store.get_item(vm=vm)
    policy = make_policy(**{**item.policy.to_dict(), **changes})
    ctx.store.update_item(vm=vm, policy=policy)
    return item_view(ctx, ctx.store.get_item(vm=vm))


def check_vm(ctx: Context, **arguments: Any) -> dict[str, Any]:
    """Forwarded to :func:`siterecovery.services.checks.check_vm`."""
    from siterecovery.services import checks

    return checks.check_vm(ctx, **arguments)


def check_together(ctx: Context, **arguments: Any) -> dict[str, Any]:
    """Forwarded to :func:`siterecovery.services.checks.check_together`."""
    from siterecovery.services import checks

    return checks.check_together(ctx, **arguments)


def find_point_by_id(ctx: Context, *, point_id: str) -> RecoveryPoint:
    vm = point_id.rsplit("-", 1)[0]
    return find_point(ctx, vm=vm, point_id=point_id)


@contextmanager
def point_devices(ctx: Context, point: RecoveryPoint) -> Iterator[list[BlockDevice]]:
    """The disks of ``point`` served read-only by a private daemon."""
    site = ctx.store.get_site(name=point.site)
    provider = ctx.provider(site)
    specs = [
        DiskSpec(node=disk, path=provider.replica_dir(site, point.vm, disk) / file, writable=False)
        for disk, file in sorted(point.files.items())
    ]
    daemon = StorageDaemon.start(provider.run_dir(site, f"point-{point.id}"), specs, detached=False)
    try:
        with open_all(daemon.nbd_socket, [s.node for s in specs]) as devices:
            yield devices
    finally:
        daemon.stop()


@contextmanager
def open_all(socket: Any, exports: list[str]) -> Iterator[list[BlockDevice]]:
    devices: list[BlockDevice] = []
    try:
        for export in exports:
            devices.append(NbdDevice.connect(socket, export))
        yield devices
    finally:
        for device in devices:
            device.close()


def source_vm(ctx: Context, item: Item) -> tuple[Site, Vm]:
    return ctx.store.get_site(name=item.active_site), ctx.store.get_vm(
        name=item.vm, site=item.active_site
    )
