"""Protection of VMs: protect, disable, items with health, recovery points, checks."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import (
    AlreadyProtected,
    DrillActive,
    InvalidInput,
    PointNotFound,
    SameSite,
    VmCopyAtTarget,
    VmNotFound,
)
from siterecovery.domain.lifecycle import ALLOWED, ItemState, Operation, require
from siterecovery.domain.model import (
    COMPRESSIONS,
    Health,
    Item,
    Policy,
    RecoveryPoint,
    Site,
    Vm,
    utcnow,
)
from siterecovery.domain.plan import Plan
from siterecovery.domain.values import (
    check_name,
    check_positive,
    duration_text,
    parse_duration,
    parse_size,
)
from siterecovery.services import agents, inventory, keys, ownership
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
    compress: str = "none",
    key: str | None = None,
    given: Collection[str] = (),
) -> Policy:
    """A validated policy (every field checked, InvalidInput names the bad one).

    ``given`` names the fields the user gave (the others are defaults or kept):
    a retention shorter than the interval is blamed on the one the user gave,
    in their words. ``key`` is checked as a name only: that the vault holds it
    is for :func:`protect` and :func:`update_policy` to check (:func:`require_key`)."""
    seconds = parse_duration("interval", interval, minimum=MIN_INTERVAL)
    keep = parse_duration("retention", retention)
    if keep < seconds:
        blamed = "retention" if "retention" in given and "interval" not in given else "interval"
        raise InvalidInput(
            field=blamed,
            reason=f"an interval of {duration_text(seconds)} is longer than the retention of "
            f"{duration_text(keep)}{'' if 'retention' in given else ' (--retention not given)'}: a "
            f"point would be deleted before the next is taken; give --retention "
            f"{duration_text(seconds)} or more, or a shorter --interval",
        )
    if app_consistent_every < 0:
        raise InvalidInput(field="app-consistent-every", reason="must be 0 (never) or more")
    rate = parse_size("max-rate", max_rate, minimum=0) if max_rate not in (0, "0") else 0
    if compress not in COMPRESSIONS:
        allowed = " or ".join(COMPRESSIONS)
        raise InvalidInput(field="compress", reason=f"'{compress}' is not one of {allowed}")
    return Policy(
        interval=seconds,
        app_consistent_every=app_consistent_every,
        retention=keep,
        threads=check_positive("threads", threads, maximum=64),
        max_rate=rate,
        verify_points=verify_points,
        compress=compress,
        key=None if key is None else check_name("key", key),
    )


def require_key(ctx: Context, policy: Policy) -> None:
    """The policy's key, if any, is a transfer key of the vault (KeyNotFound otherwise)."""
    if policy.key is not None:
        keys.transfer_key(ctx, name=policy.key)


def protect(ctx: Context, *, vm: str, to: str, policy: Policy, submit: Submit) -> dict[str, Any]:
    """Start protecting ``vm`` toward site ``to``; returns the enable job."""
    target = ctx.store.get_site(name=to)
    require_key(ctx, policy)
    existing = ctx.store.find_item(vm=vm)
    if existing is not None and existing.state is not ItemState.DISABLED:
        raise AlreadyProtected(
            vm=vm,
            state=existing.state.value,
            source=existing.active_site,
            target=existing.standby_site,
        )
    # A disabled item's VM runs where it last ran (its other copy may linger).
    try:
        source_vm = ctx.store.get_vm(name=vm, site=existing.active_site if existing else None)
    except VmNotFound:
        if existing is not None:
            raise
        # A domain that the owner of a kvm host defined: taken in first.
        source_vm = inventory.adopt_vm(ctx, name=vm)
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
    ctx.store.update_item_tracking(
        vm=item.vm,
        change=lambda t: replace(
            t,
            home=t.home or vm.site,
            hosts={**t.hosts, vm.site: vm.host},
            kinds={**t.kinds, vm.site: host.kind},
        ),
    )


def plan_disable(ctx: Context, *, vm: str) -> Plan:
    """What ``disable`` would do: its checks, and every recovery point it deletes."""
    item = ctx.store.get_item(vm=vm)
    plan = Plan("disable", vm, item.active_site, item.standby_site)
    plan.add("state allows disable", lambda: require(item.state, Operation.DISABLE, vm=vm))

    def no_drill() -> None:
        drill = ctx.store.item_tracking(vm=vm).drill
        if drill is not None:
            raise DrillActive(vm=vm, site=drill.site)

    plan.add("no test failover running", no_drill)
    points = ctx.store.list_points(vm=vm)
    plan.will_delete = [f"recovery point {p.id} ({p.type.value}) at {p.site}" for p in points]
    if not points:
        plan.will_delete = [f"the replica chains of {vm} at {item.standby_site} (no point yet)"]
    return plan


def disable(ctx: Context, *, vm: str, dry_run: bool = False) -> dict[str, Any]:
    """Stop protecting ``vm``: replication stops and its recovery points are deleted.

    Refused (VM_BUSY naming the job, nothing changed) while a job owns the item;
    a replication pass is stopped at its next chunk. Replica files that a VM's
    disks are backed by (a failed-over VM on a point) are kept: only what no
    disk needs is deleted. ``dry_run``: the plan (what would be deleted), nothing done.
    """
    if dry_run:
        return plan_disable(ctx, vm=vm).to_dict()
    require(ctx.store.get_item(vm=vm).state, Operation.DISABLE, vm=vm)
    owner = ownership.operation_owner("disable")
    ownership.take(ctx, vm, owner)
    try:
        item = ctx.store.get_item(vm=vm)
        require(item.state, Operation.DISABLE, vm=vm)
        drill = ctx.store.item_tracking(vm=vm).drill
        if drill is not None:
            raise DrillActive(vm=vm, site=drill.site)
        ctx.store.update_item(vm=vm, state=ItemState.DISABLED)
        kept = _delete_replicas(ctx, item)
        ctx.store.delete_points(ids=[p.id for p in ctx.store.list_points(vm=vm)])
        ctx.store.update_item_tracking(
            vm=vm, change=lambda t: replace(t, next_seq=1, resume=None, pending_merges=())
        )
    finally:
        ownership.release(ctx, vm, owner)
    return {**item_view(ctx, ctx.store.get_item(vm=vm)), "kept_replica_files": kept}


def _delete_replicas(ctx: Context, item: Item) -> list[str]:
    """Delete the item's replica chains at its standby site, except every file a
    VM disk at that site (the VM, its drill copy) reads through. Returns the
    files kept."""
    site = item.standby_site
    users = [
        v for name in (item.vm, f"{item.vm}-test") for v in ctx.store.find_vms(name=name, site=site)
    ]
    return ctx.site(site).delete_chains(item.vm, keep_for=users)


def health(
    item: Item, latest: RecoveryPoint | None, *, site_down: bool = False
) -> tuple[Health, float | None]:
    """Health and RPO (seconds since the latest point) of an item.

    Protected items are healthy while the RPO stays within two intervals (plus
    30 s of slack), in warning up to six, critical beyond or with no point. A
    failed last pass makes a healthy item a warning. Items in other states
    have no health unless their last operation failed (critical). An item one
    of whose sites does not answer (``site_down``) is critical unless disabled.
    """
    rpo = (utcnow() - latest.time).total_seconds() if latest else None
    if site_down and item.state is not ItemState.DISABLED:
        return Health.CRITICAL, rpo
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
    down = _unreachable_site(ctx, item)
    state, rpo = health(item, latest, site_down=down is not None)
    tracking = ctx.store.item_tracking(vm=item.vm)
    return {
        **item.to_dict(),
        "health": state.value,
        "site_unreachable": down,
        "rpo_seconds": round(rpo, 3) if rpo is not None else None,
        "points": len(points),
        "latest_point": latest.to_dict() if latest else None,
        "latest_app_consistent_point": app[-1].to_dict() if app else None,
        "last_pass": dict(tracking.last_pass) if tracking.last_pass is not None else None,
        "last_quiesce": tracking.last_quiesce,
        "home_site": tracking.home,
        "busy_job": _job_owner(ctx, item.vm),
        "failover": tracking.failover.to_json() if tracking.failover else None,
        "drill": tracking.drill.to_json() if tracking.drill else None,
        "allowed_operations": sorted(op.value for op in _allowed(item)),
    }


def _unreachable_site(ctx: Context, item: Item) -> dict[str, Any] | None:
    """The first of the item's sites (active, then standby) whose agent the
    health monitor last saw unreachable: site, code, since, message (None: both answer)."""
    for site in (item.active_site, item.standby_site):
        seen = agents.site_health(ctx, site)
        if seen is not None and not seen.reachable:
            return {"site": site, "url": seen.url, "code": seen.error, "since": seen.since,
                    "message": seen.message}  # fmt: skip
    return None


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
    """Change the item's policy: ``changes`` are :func:`make_policy`'s fields
    (``key=None`` removes the key); nothing changes when one is refused."""
    item = ctx.store.get_item(vm=vm)
    policy = make_policy(**{**item.policy.to_dict(), **changes}, given=set(changes))
    require_key(ctx, policy)
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


def source_vm(ctx: Context, item: Item) -> tuple[Site, Vm]:
    return ctx.store.get_site(name=item.active_site), ctx.store.get_vm(
        name=item.vm, site=item.active_site
    )
