"""Failover, failback, commit, reprotect and drills: plans, rules and jobs.

Each operation builds a :class:`Plan` (its preconditions, the point, what moves,
what is created and deleted). ``dry_run`` returns the plan; otherwise the first
failed precondition is raised before any side effect and a durable job is
submitted. The jobs themselves are in ``jobs/failover_flows.py``.

What an item remembers between operations (``home``: the site protection
began at, failing toward it is a failback; ``hosts``, ``kinds``, the last
``failover``, the ``drill``…) is :class:`~siterecovery.domain.tracking.ItemTracking`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import (
    DrillActive,
    FailedOverVmMissing,
    FailoverNotCommitted,
    HostDisconnected,
    HypervisorMismatch,
    InvalidInput,
    JobNotFound,
    NoBlockAccess,
    NoDrill,
    NoRecoveryPoint,
    OperationNotAllowed,
    PointNotFound,
    ProtectionDisabled,
    ReplicationUnhealthy,
    SwitchMissing,
    TargetVmElsewhere,
    TargetVmMissing,
)
from siterecovery.domain.lifecycle import ItemState, Operation, require, require_group_together
from siterecovery.domain.model import Host, Item, JobState, PointType, RecoveryPoint, Vm
from siterecovery.domain.plan import Plan, check
from siterecovery.domain.tracking import ItemTracking
from siterecovery.domain.values import check_name, check_positive
from siterecovery.services import agents, ownership
from siterecovery.services.protection import health, item_view
from siterecovery.store.owner_repo import PASS_PREFIX

Submit = Callable[..., Any]

TYPES = ("test", "planned", "unplanned")
SYNCS = ("delta", "full")
SELECTORS = ("latest", "latest-processed", "latest-app-consistent")
DRILL_SWITCH = "sr-drill-isolated"


@dataclass(frozen=True, slots=True)
class FailoverRequest:
    vm: str
    type: str
    point: str = "latest"
    sync: str = "delta"
    host: str | None = None
    create_vm: bool = False
    switch: str | None = None
    threads: int | None = None
    key: str | None = None
    together: tuple[str, ...] = ()
    """The VMs failing over in the same operation (a recovery plan): a
    replication-group member may fail over only with all its group."""

    def validated(self) -> FailoverRequest:
        if self.type not in TYPES:
            raise InvalidInput(field="type", reason=f"'{self.type}' is not one of {TYPES}")
        if self.sync not in SYNCS:
            raise InvalidInput(field="sync", reason=f"'{self.sync}' is not one of {SYNCS}")
        if self.threads is not None:
            check_positive("threads", self.threads, maximum=64)
        if self.switch is not None:
            check_name("switch", self.switch)
        return self


def tracking(ctx: Context, vm: str) -> ItemTracking:
    return ctx.store.item_tracking(vm=vm)


def home_of(ctx: Context, item: Item) -> str:
    return tracking(ctx, item.vm).home or item.active_site


def require_idle(ctx: Context, item: Item) -> None:
    """No job owns the item (a replication pass gives way, see ownership.take)."""
    owner, _claim = ctx.store.item_owner(vm=item.vm)
    if owner and not owner.startswith(PASS_PREFIX):
        raise ownership.busy(item.vm, owner)


def owned_submit(
    ctx: Context,
    submit: Submit,
    workflow: Callable[..., Any],
    *,
    kind: str,
    vm: str,
    state: ItemState | None = None,
    **rest: Any,
) -> Any:
    """Submit a job that owns its item: the item is taken (compare-and-set) for the
    job's id *before* the job can start, so of two requests exactly one gets a job
    and the job's own release at its end can never come first. ``state`` is set
    on the item once it is owned (and put back if the job cannot be submitted)."""
    from siterecovery.jobs.runtime import new_job_id

    job_id = new_job_id()
    ownership.take(ctx, vm, job_id)
    before = ctx.store.get_item(vm=vm)
    try:
        if state is not None:
            ctx.store.update_item(vm=vm, state=state, last_error=None)
        return submit(workflow, kind=kind, vm=vm, job_id=job_id, **rest)
    except BaseException:
        if state is not None:
            ctx.store.update_item(vm=vm, state=before.state, last_error=before.last_error)
        ownership.release(ctx, vm, job_id)
        raise


# Failover -------------------------------------------------------------------


def failover(
    ctx: Context, request: FailoverRequest, *, submit: Submit, dry_run: bool = False
) -> dict[str, Any]:
    """Plan, then (unless ``dry_run``) start the failover job of ``request``."""
    request = request.validated()
    item = ctx.store.get_item(vm=request.vm)
    kind, plan = plan_failover(ctx, item, request)
    if dry_run:
        return plan.to_dict()
    plan.raise_first()
    params = job_params(kind, request, plan)
    job = owned_submit(ctx, submit, workflows()[kind], kind=kind, vm=item.vm, params=params)
    return {"job": job.id, "kind": kind, "plan": plan.to_dict()}


def plan_failover(ctx: Context, item: Item, request: FailoverRequest) -> tuple[str, Plan]:
    """The job kind a failover of ``item`` is, and its plan (checks run, nothing done).

    The first check probes the agents of the sites it needs (fresh, a short
    timeout); when one does not answer it is the plan's only check: nothing
    else can be checked without it, and nothing waits on a dead agent."""
    kind = failover_kind(item, request)
    what = f"the {kind.replace('-', ' ')} of {item.vm}"
    sites = _sites_needed(item, kind)
    answer = check("sites reachable", lambda: agents.require_reachable(ctx, sites, what=what))
    if not answer.ok:
        return kind, Plan(kind, item.vm, checks=[answer])
    plan = _PLANNERS[kind](ctx, item, request)
    plan.checks.insert(0, answer)
    return kind, plan


def _sites_needed(item: Item, kind: str) -> list[str]:
    """The sites whose agents a failover needs: an unplanned one only its target
    (the source may be the disaster), every other kind both."""
    if kind == "unplanned-failover":
        return [recovery_site(item)]
    return [item.active_site, item.standby_site]


def failover_kind(item: Item, request: FailoverRequest) -> str:
    if request.type == "test":
        return "test-failover"
    if request.type == "unplanned":
        return "unplanned-failover"
    if item.state in (ItemState.COMMITTED, ItemState.INCONSISTENT):
        return "failback"
    return "planned-failover"


def workflows() -> dict[str, Callable[..., Any]]:
    """The workflow of each job kind (imported late: jobs depend on services)."""
    from siterecovery.jobs import failback_flow, failover_flows

    return {
        "test-failover": failover_flows.test_failover_workflow,
        "unplanned-failover": failover_flows.unplanned_failover_workflow,
        "planned-failover": failover_flows.planned_failover_workflow,
        "failback": failback_flow.failback_workflow,
        "commit": failover_flows.commit_workflow,
        "reprotect": failover_flows.reprotect_workflow,
        "cleanup-test": failover_flows.cleanup_test_workflow,
    }


def job_params(kind: str, request: FailoverRequest, plan: Plan) -> dict[str, Any]:
    params: dict[str, Any] = {"vm": request.vm, "host": plan.host}
    if kind != "test-failover":
        # The direction is decided here, once: a workflow never reads it live.
        params.update(frm=plan.source, to=plan.target)
    if kind in ("test-failover", "unplanned-failover"):
        params["point"] = plan.point["id"] if plan.point else None
    if kind == "test-failover":
        params["switch"] = request.switch or DRILL_SWITCH
    if kind == "failback":
        params.update(sync=request.sync, create_vm=request.create_vm, threads=request.threads)
    return params


def _common_checks(
    ctx: Context, plan: Plan, item: Item, operation: Operation, request: FailoverRequest
) -> None:
    _state_check(plan, item, operation)
    group = ctx.store.group_of(vm=item.vm)
    name = group.name if group else None
    whole = group is not None and set(group.members) <= set(request.together)
    plan.add(
        "not a group member alone",
        lambda: require_group_together(item.vm, name, whole_group=whole),
    )
    plan.add("no other job owns the item", lambda: require_idle(ctx, item))


def _key_check(plan: Plan, item: Item, key: str | None) -> None:
    """``--key`` names the key of an encrypted item; this item's replicas are not
    encrypted, so a key given for it is a mistake worth saying."""

    def matches() -> None:
        if key is not None:
            raise InvalidInput(
                field="key",
                reason=f"the replicas of '{item.vm}' are not encrypted; drop --key {key}",
            )

    plan.add("key matches the item's encryption", matches)


def recovery_site(item: Item) -> str:
    """Where a failover of ``item`` starts the VM: the standby site, or, when it
    already failed over (a re-run with another point), where it went."""
    return item.active_site if item.state is ItemState.FAILED_OVER else item.standby_site


def select_point(ctx: Context, item: Item, selector: str) -> RecoveryPoint:
    """The point ``selector`` names among the item's points at its recovery site."""
    site = recovery_site(item)
    points = ctx.store.list_points(vm=item.vm, site=site)
    if selector in ("latest", "latest-processed"):
        if not points:
            raise NoRecoveryPoint(vm=item.vm, kind="", site=site)
        return points[-1]
    if selector == "latest-app-consistent":
        app = [p for p in points if p.type is PointType.APP_CONSISTENT]
        if not app:
            raise NoRecoveryPoint(vm=item.vm, kind="app-consistent", site=site)
        return app[-1]
    for point in points:
        if point.id == selector:
            return point
    raise PointNotFound(name=selector, vm=item.vm)


def _plan_point(ctx: Context, plan: Plan, item: Item, selector: str) -> RecoveryPoint | None:
    found: list[RecoveryPoint] = []
    plan.add("recovery point", lambda: found.append(select_point(ctx, item, selector)))
    if found:
        plan.point = found[0].to_dict()
    return found[0] if found else None


def _source_vm(ctx: Context, item: Item) -> Vm | None:
    found = ctx.store.find_vms(name=item.vm, site=item.active_site)
    return found[0] if found else None


def choose_host(ctx: Context, item: Item, site: str, requested: str | None, vm: Vm) -> Host:
    """The host the VM will run on at ``site``: asked for, its last one, or a fitting one."""
    if requested is not None:
        host = ctx.store.get_host(name=requested)
        if host.site != site:
            raise InvalidInput(field="host", reason=f"host '{requested}' is not at site '{site}'")
        return host
    hosts = ctx.store.list_hosts(site=site)
    previous = tracking(ctx, item.vm).hosts.get(site)
    for host in hosts:
        if host.name == previous:
            return host
    fitting = [h for h in hosts if h.connected and set(vm.nics) <= set(h.switches)]
    if not (fitting or hosts):
        raise InvalidInput(field="host", reason=f"site '{site}' has no host; add one")
    return (fitting or hosts)[0]


def _host_checks(
    ctx: Context, plan: Plan, item: Item, vm: Vm, site: str, requested: str | None
) -> Host | None:
    hosts: list[Host] = []
    if not plan.add(
        "target host", lambda: hosts.append(choose_host(ctx, item, site, requested, vm))
    ):
        return None
    host = hosts[0]
    plan.host = host.name

    def connected() -> None:
        if not host.connected:
            raise HostDisconnected(host=host.name)

    def switches() -> None:
        for nic in vm.nics:
            if nic not in host.switches:
                raise SwitchMissing(host=host.name, switch=nic, vm=vm.name)

    plan.add("host connected", connected)
    plan.add("host has the VM's switches", switches)
    if site == home_of(ctx, item):
        plan.add("same hypervisor kind", lambda: _same_kind(ctx, item, host))
    return host


def _same_kind(ctx: Context, item: Item, host: Host) -> None:
    origin = tracking(ctx, item.vm).kinds.get(home_of(ctx, item), host.kind)
    if host.kind != origin:
        raise HypervisorMismatch(host=host.name, kind=host.kind, vm=item.vm, expected=origin)


def _block_access(ctx: Context, item: Item) -> None:
    storage = ctx.site(item.active_site).storage()
    if storage != "block":
        raise NoBlockAccess(vm=item.vm, site=item.active_site, storage=storage)


def _healthy_reverse(ctx: Context, item: Item) -> None:
    """Failing back a replicated item (VMware path) needs healthy replication."""
    points = ctx.store.list_points(vm=item.vm, site=item.standby_site)
    state, _rpo = health(item, points[-1] if points else None)
    if state.value != "healthy":
        reason = f": {item.last_error['message']}" if item.last_error else ""
        raise ReplicationUnhealthy(
            vm=item.vm,
            direction=f"{item.active_site} -> {item.standby_site}",
            health=state.value,
            reason=reason,
        )


def _plan_unplanned(ctx: Context, item: Item, request: FailoverRequest) -> Plan:
    source = item.standby_site if item.state is ItemState.FAILED_OVER else item.active_site
    plan = Plan("unplanned-failover", item.vm, source, recovery_site(item))
    _common_checks(ctx, plan, item, Operation.UNPLANNED_FAILOVER, request)
    point = _plan_point(ctx, plan, item, request.point)
    vm = _source_vm(ctx, item) or _any_vm(ctx, item)
    if item.state is ItemState.PROTECTED and item.standby_site == home_of(ctx, item):
        plan.add("reverse replication healthy", lambda: _healthy_reverse(ctx, item))
        plan.add("recovery-site disks have block access", lambda: _block_access(ctx, item))
    target = recovery_site(item)
    if vm is not None:
        _host_checks(ctx, plan, item, vm, target, request.host)
    if point is not None:
        plan.bytes_note = "nothing is copied: the VM starts on an overlay of the point"
    plan.will_create.append(f"VM {item.vm} at {target}")
    if item.state is ItemState.FAILED_OVER:
        plan.will_delete.append(f"VM {item.vm} at {target} (the previous failover)")
    return plan


def _any_vm(ctx: Context, item: Item) -> Vm | None:
    found = ctx.store.find_vms(name=item.vm)
    return found[0] if found else None


def _plan_planned(ctx: Context, item: Item, request: FailoverRequest) -> Plan:
    plan = Plan("planned-failover", item.vm, item.active_site, item.standby_site)
    _common_checks(ctx, plan, item, Operation.PLANNED_FAILOVER, request)
    vm = _source_vm(ctx, item)
    plan.add("source VM exists", lambda: _require_vm(vm, item.vm, item.active_site))
    if item.standby_site == home_of(ctx, item):
        plan.add("reverse replication healthy", lambda: _healthy_reverse(ctx, item))
        plan.add("recovery-site disks have block access", lambda: _block_access(ctx, item))
    if vm is not None:
        _host_checks(ctx, plan, item, vm, item.standby_site, request.host)
    plan.bytes_note = "the changes since the latest point, sent after the source stops"
    plan.will_create.append(f"VM {item.vm} at {item.standby_site}")
    return plan


def _require_vm(vm: Vm | None, name: str, site: str) -> None:
    if vm is None:
        raise FailedOverVmMissing(vm=name, site=site)


def _plan_failback(ctx: Context, item: Item, request: FailoverRequest) -> Plan:
    plan = Plan("failback", item.vm, item.active_site, item.standby_site, sync=request.sync)
    _common_checks(ctx, plan, item, Operation.PLANNED_FAILOVER, request)
    _key_check(plan, item, request.key)
    vm = _source_vm(ctx, item)
    plan.add("failed-over VM still exists", lambda: _require_vm(vm, item.vm, item.active_site))
    plan.add("recovery-site disks have block access", lambda: _block_access(ctx, item))
    if vm is None:
        return plan
    host = _host_checks(ctx, plan, item, vm, item.standby_site, request.host)
    target = ctx.store.find_vms(name=item.vm, site=item.standby_site)

    def target_exists() -> None:
        if not target and not request.create_vm:
            where = host.name if host else "?"
            raise TargetVmMissing(vm=item.vm, host=where, site=item.standby_site)

    plan.add("target VM exists or --create-vm", target_exists)

    def stays_on_its_host() -> None:
        if target and host is not None and target[0].host != host.name:
            raise TargetVmElsewhere(
                vm=item.vm, site=item.standby_site, current=target[0].host, host=host.name
            )

    plan.add("the target VM is on the host asked for", stays_on_its_host)
    if not target:
        plan.will_create.append(f"VM {item.vm} at {item.standby_site} on {plan.host}")
    elif request.create_vm:
        plan.notes.append(
            f"--create-vm creates nothing: VM {item.vm} exists at {item.standby_site} on "
            f"{target[0].host} and the failback writes into it (to fail back into a new VM, "
            f"delete it first: `siterecovery vm delete {item.vm} --site {item.standby_site}`)"
        )
    if target and plan.ok:
        plan.bytes_to_move, plan.bytes_note = _failback_bytes(ctx, item, vm, target[0], request)
    elif plan.ok:
        plan.bytes_to_move = sum(d.size for d in vm.disks)
        plan.bytes_note = "a new VM: every allocated byte of the source"
    return plan


def _failback_bytes(
    ctx: Context, item: Item, source: Vm, target: Vm, request: FailoverRequest
) -> tuple[int, str]:
    from siterecovery.replication import failback

    def side(vm: Vm) -> failback.Side:
        return failback.Side(vm, ctx.site(vm.site))

    since = tracking(ctx, item.vm).failover
    return failback.estimate(side(source), side(target), since, request.sync)


def _plan_test(ctx: Context, item: Item, request: FailoverRequest) -> Plan:
    plan = Plan("test-failover", item.vm, item.active_site, item.standby_site)
    _common_checks(ctx, plan, item, Operation.TEST_FAILOVER, request)
    drill = tracking(ctx, item.vm).drill

    def no_drill() -> None:
        if drill is not None:
            raise DrillActive(vm=item.vm, site=drill.site)

    plan.add("no drill running", no_drill)
    _plan_point(ctx, plan, item, request.point)
    vm = _source_vm(ctx, item)
    if vm is not None:
        hosts: list[Host] = []
        plan.add(
            "target host",
            lambda: hosts.append(choose_host(ctx, item, item.standby_site, request.host, vm)),
        )
        plan.host = hosts[0].name if hosts else None
    plan.bytes_note = "nothing is copied; replication goes on"
    plan.will_create.append(
        f"VM {item.vm}-test at {item.standby_site} on switch {request.switch or DRILL_SWITCH}"
    )
    return plan


_PLANNERS: dict[str, Callable[[Context, Item, FailoverRequest], Plan]] = {
    "test-failover": _plan_test,
    "unplanned-failover": _plan_unplanned,
    "planned-failover": _plan_planned,
    "failback": _plan_failback,
}


# Commit, reprotect, complete, cleanup ----------------------------------------


def commit(ctx: Context, *, vm: str, submit: Submit, dry_run: bool = False) -> dict[str, Any]:
    plan = plan_commit(ctx, ctx.store.get_item(vm=vm))
    if dry_run:
        return plan.to_dict()
    plan.raise_first()
    workflow = workflows()["commit"]
    job = owned_submit(ctx, submit, workflow, kind="commit", vm=vm, params={"vm": vm})
    return {"job": job.id, "plan": plan.to_dict()}


def plan_commit(ctx: Context, item: Item) -> Plan:
    vm = item.vm
    plan = Plan("commit", vm, item.standby_site, item.active_site)
    _state_check(plan, item, Operation.COMMIT)
    plan.add("no other job owns the item", lambda: require_idle(ctx, item))
    is_failback = item.active_site == home_of(ctx, item)
    if is_failback and ctx.store.find_vms(name=vm, site=item.standby_site):
        plan.will_delete.append(f"VM {vm} and its disks at {item.standby_site}")
    return plan


def _state_check(plan: Plan, item: Item, operation: Operation) -> None:
    """The lifecycle allows ``operation``; the seeds' own words where they have some."""

    def state_allows() -> None:
        if item.state is ItemState.DISABLED:
            raise ProtectionDisabled(vm=item.vm)
        if item.state is ItemState.FAILED_OVER and operation is Operation.PLANNED_FAILOVER:
            raise FailoverNotCommitted(vm=item.vm, site=item.active_site)
        require(item.state, operation, vm=item.vm)

    plan.add("state allows " + operation.value, state_allows)


def reprotect(ctx: Context, *, vm: str, submit: Submit, dry_run: bool = False) -> dict[str, Any]:
    """Replicate again, from where the VM runs now to the other site."""
    item = ctx.store.get_item(vm=vm)
    plan = plan_reprotect(ctx, item)
    if dry_run:
        return plan.to_dict()
    plan.raise_first()
    workflow = workflows()["reprotect"]
    job = owned_submit(
        ctx,
        submit,
        workflow,
        kind="reprotect",
        vm=vm,
        state=ItemState.REPROTECTING,
        params={"vm": vm},
    )
    return {
        "job": job.id,
        "plan": plan.to_dict(),
        "item": item_view(ctx, ctx.store.get_item(vm=vm)),
    }


def plan_reprotect(ctx: Context, item: Item) -> Plan:
    vm = item.vm
    plan = Plan("reprotect", vm, item.active_site, item.standby_site)
    _state_check(plan, item, Operation.REPROTECT)
    plan.add("no other job owns the item", lambda: require_idle(ctx, item))
    source = _source_vm(ctx, item)
    plan.add("VM exists where it runs", lambda: _require_vm(source, vm, item.active_site))
    base = ctx.store.find_vms(name=vm, site=item.standby_site)
    chain = ctx.store.list_points(vm=vm, site=item.standby_site)
    if base:
        plan.will_delete.append(
            f"VM {vm} at {item.standby_site}: its disks become the base of the new replica"
        )
    if source is not None:
        plan.bytes_to_move = sum(d.size for d in source.disks)
    plan.bytes_note = (
        "only blocks that differ from the common base (checksums)"
        if base or chain
        else "every allocated block (no common base at the other site)"
    )
    return plan


def complete(ctx: Context, *, job_id: str, send: Callable[[str], None]) -> dict[str, Any]:
    """Let a failback (or a plan's) waiting in ``awaiting-completion`` start phase 2.
    ``job_id`` is the job's id, or the name of the VM whose job waits (what
    ``item show`` offers ``complete`` for)."""
    from siterecovery.services.jobs import release_wait

    job = awaiting_job(ctx, job_id)
    return release_wait(ctx, job_id=job, waiting=JobState.AWAITING_COMPLETION, send=send)


def awaiting_job(ctx: Context, ref: str) -> str:
    """The id of job ``ref``, or of the job of VM ``ref`` that awaits completion.
    JobNotFound when ``ref`` is neither a job nor a VM; OperationNotAllowed
    (naming the item's state) when the VM has no job waiting."""
    try:
        return ctx.store.get_job(job_id=ref).id
    except JobNotFound:
        pass
    waiting = [j for j in ctx.store.list_jobs(vm=ref) if j.state is JobState.AWAITING_COMPLETION]
    if waiting:
        return waiting[0].id
    item = ctx.store.find_item(vm=ref)
    if item is None:
        raise JobNotFound(name=ref)
    raise OperationNotAllowed(
        operation="complete",
        vm=ref,
        state=f"{item.state.value}, with no failback awaiting completion",
        allowed=", ".join(item_view(ctx, item)["allowed_operations"]) or "nothing now",
    )


def cleanup_test(ctx: Context, *, vm: str, submit: Submit) -> dict[str, Any]:
    item = ctx.store.get_item(vm=vm)
    plan_cleanup_test(ctx, item).raise_first()
    workflow = workflows()["cleanup-test"]
    job = owned_submit(ctx, submit, workflow, kind="cleanup-test", vm=vm, params={"vm": vm})
    return {"job": job.id, "item": item_view(ctx, item)}


def plan_cleanup_test(ctx: Context, item: Item) -> Plan:
    plan = Plan("cleanup-test", item.vm, item.active_site, item.standby_site)

    def drill_exists() -> None:
        if tracking(ctx, item.vm).drill is None:
            raise NoDrill(vm=item.vm)

    plan.add("a test failover to clean up", drill_exists)
    return plan


def target_vm(ctx: Context, item: Item, site: str, host: str, *, source: Vm) -> Vm:
    """The VM definition at ``site`` on ``host``, copied from ``source``."""
    return replace(source, site=site, host=host)
