"""Protection of VMs: protect, disable, items with health, recovery points, checks."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.domain.errors import (
    AlreadyProtected,
    InvalidInput,
    PointNotFound,
    SameSite,
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
from siterecovery.providers.local import journal
from siterecovery.services.context import Context

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
    source_vm = ctx.store.get_vm(name=vm)
    target = ctx.store.get_site(name=to)
    existing = ctx.store.find_item(vm=vm)
    if existing is not None and existing.state is not ItemState.DISABLED:
        raise AlreadyProtected(
            vm=vm,
            state=existing.state.value,
            source=existing.active_site,
            target=existing.standby_site,
        )
    if target.name == source_vm.site:
        raise SameSite(vm=vm, site=source_vm.site)
    item = Item(
        vm=vm,
        active_site=source_vm.site,
        standby_site=target.name,
        state=ItemState.ENABLING,
        policy=policy,
        created=utcnow(),
    )
    if existing is None:
        ctx.store.add_item(item=item)
    else:
        require(existing.state, Operation.PROTECT, vm=vm)
        ctx.store.update_item(
            vm=vm,
            active_site=item.active_site,
            standby_site=item.standby_site,
            state=item.state,
            policy=policy,
            last_error=None,
        )
    _remember_origin(ctx, item, source_vm)
    from siterecovery.jobs.workflows import protect_workflow

    job = submit(protect_workflow, kind="protect", vm=vm, params={"vm": vm})
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
    """Stop protecting ``vm``: replication stops and its replica chain is deleted."""
    item = ctx.store.get_item(vm=vm)
    require(item.state, Operation.DISABLE, vm=vm)
    with ctx.item_lock(vm):
        ctx.store.update_item(vm=vm, state=ItemState.DISABLED)
        target = ctx.store.get_site(name=item.standby_site)
        provider = ctx.provider(target)
        source_vm = ctx.store.get_vm(name=vm, site=item.active_site)
        for disk in source_vm.disks:
            shutil.rmtree(provider.replica_dir(target, vm, disk.name), ignore_errors=True)
        ctx.store.delete_points(ids=[p.id for p in ctx.store.list_points(vm=vm)])
        ctx.store.merge_tracking(vm=vm, next_seq=1, resume=None, pending_merges=[])
    return item_view(ctx, ctx.store.get_item(vm=vm))


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
        "busy_job": tracking.get("busy"),
        "failover": tracking.get("failover"),
        "drill": tracking.get("drill"),
        "allowed_operations": sorted(op.value for op in _allowed(item)),
    }


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


def check_vm(
    ctx: Context, *, name: str, site: str | None = None, point: str | None = None
) -> dict[str, Any]:
    """Check the guest journal of a VM's disks, or of a recovery point's image."""
    report, where = _check(ctx, name, site, point)
    return {**report.to_dict(), "vm": name, **where}


def check_together(
    ctx: Context, *, vms: list[str], site: str | None = None, points: list[str] | None = None
) -> dict[str, Any]:
    """Check several VMs (live, or the given points of some) and their links: no
    record of one may depend on a record another lacks (replication groups)."""
    chosen = {p.vm: p for p in (find_point_by_id(ctx, point_id=i) for i in points or [])}
    stray = sorted(set(chosen) - set(vms))
    if stray:
        raise InvalidInput(field="point", reason=f"points of {', '.join(stray)}: name those VMs")
    checked = {}
    for vm in vms:
        point = chosen.get(vm)
        checked[vm] = _check(ctx, vm, site, point.id if point else None)
    dangling = journal.dangling_links({vm: report for vm, (report, _) in checked.items()})
    return {
        "consistent": not dangling and all(r.consistent for r, _ in checked.values()),
        "vms": {vm: {**r.to_dict(), "vm": vm, **where} for vm, (r, where) in checked.items()},
        "links": {"consistent": not dangling, "errors": dangling},
    }


def _check(
    ctx: Context, name: str, site: str | None, point: str | None
) -> tuple[journal.CheckReport, dict[str, Any]]:
    if point is not None:
        target = find_point(ctx, vm=name, point_id=point)
        with point_devices(ctx, target) as devices:
            return journal.check(devices), {"point": point, "site": target.site}
    vm = ctx.store.get_vm(name=name, site=site)
    owner = ctx.store.get_site(name=vm.site)
    with (
        ctx.provider(owner).disk_access(owner, vm) as access,
        open_all(access.nbd_socket, [access.nodes[d.name] for d in vm.disks]) as devices,
    ):
        return journal.check(devices), {"site": vm.site}


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
