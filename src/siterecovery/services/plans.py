"""Recovery plans: define them, and fail many VMs over, back, commit and reprotect.

A plan operation plans every VM with the single-VM planner of
``services/failover.py`` (same rules, same dry-run) plus the plan's own rules:
the plan holds VMs, every VM has a recovery point, replication groups fail over
whole and get the points the seed names. Then one parent job runs a child job
per VM, boot group by boot group (``jobs/plan_flow.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import (
    InvalidInput,
    NoRecoveryPoint,
    PlanEmpty,
    PlanWithoutPoints,
    SiteRecoveryError,
    VmNotFound,
)
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import Item, PointType, RecoveryPoint, utcnow
from siterecovery.domain.plan import Check, Plan, check
from siterecovery.domain.recovery import RecoveryPlan, make_action
from siterecovery.domain.values import check_name
from siterecovery.services import failover as single

Submit = Callable[..., Any]
PLAN_SELECTORS = ("latest", "latest-processed", "latest-app-consistent")


# Definition --------------------------------------------------------------------


def create_plan(ctx: Context, *, name: str, description: str = "") -> dict[str, Any]:
    check_name("name", name)
    plan = RecoveryPlan(name=name, created=utcnow(), description=description[:1024])
    return plan_view(ctx, ctx.store.add_plan(plan=plan))


def add_vms(ctx: Context, *, name: str, group: int, vms: list[str]) -> dict[str, Any]:
    """Add ``vms`` to boot group ``group`` (1..N+1: N+1 opens a new group)."""
    plan = ctx.store.get_plan(name=name)
    if not vms:
        raise InvalidInput(field="vms", reason="name at least one VM")
    for vm in vms:
        if not ctx.store.find_vms(name=vm):
            raise VmNotFound(name=vm)
    return plan_view(ctx, ctx.store.save_plan(plan=plan.with_vms(group, vms)))


def remove_vm(ctx: Context, *, name: str, vm: str) -> dict[str, Any]:
    plan = ctx.store.get_plan(name=name)
    if plan.group_of(vm) is None:
        raise InvalidInput(field="vm", reason=f"'{vm}' is not in plan '{name}'")
    return plan_view(ctx, ctx.store.save_plan(plan=plan.without_vm(vm)))


def add_action(
    ctx: Context,
    *,
    name: str,
    group: int,
    action: str,
    kind: str,
    when: str,
    command: str | None = None,
    instructions: str | None = None,
    timeout: float = 300.0,
) -> dict[str, Any]:
    plan = ctx.store.get_plan(name=name)
    made = make_action(
        name=action, kind=kind, when=when, command=command,
        instructions=instructions, timeout=timeout,
    )  # fmt: skip
    return plan_view(ctx, ctx.store.save_plan(plan=plan.with_action(group, made)))


def delete_plan(ctx: Context, *, name: str) -> dict[str, Any]:
    plan = ctx.store.get_plan(name=name)
    ctx.store.delete_plan(name=name)
    return {"deleted": plan.name}


def list_plans(ctx: Context) -> list[dict[str, Any]]:
    return [plan_view(ctx, p) for p in ctx.store.list_plans()]


def show_plan(ctx: Context, *, name: str) -> dict[str, Any]:
    return plan_view(ctx, ctx.store.get_plan(name=name))


def plan_view(ctx: Context, plan: RecoveryPlan) -> dict[str, Any]:
    """The plan with each VM's item state, direction, group and latest point."""
    view = plan.to_dict()
    for group in view["groups"]:
        group["members"] = [_vm_view(ctx, vm) for vm in group["vms"]]
    return view


def _vm_view(ctx: Context, vm: str) -> dict[str, Any]:
    item = ctx.store.find_item(vm=vm)
    group = ctx.store.group_of(vm=vm)
    if item is None:
        return {"vm": vm, "state": "not protected", "replication_group": None}
    points = ctx.store.list_points(vm=vm, site=single.recovery_site(item))
    return {
        "vm": vm,
        "state": item.state.value,
        "direction": f"{item.active_site} -> {item.standby_site}",
        "replication_group": group.name if group else None,
        "latest_point": points[-1].id if points else None,
    }


# Operations --------------------------------------------------------------------


@dataclass
class PlanRun:
    """A plan operation's dry-run document and, when every check passes, its jobs."""

    plan: RecoveryPlan
    operation: str
    checks: list[Check] = field(default_factory=list)
    order: list[dict[str, Any]] = field(default_factory=list)
    children: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and all(
            vm["plan"]["ok"] for g in self.order for vm in g["vms"]
        )

    def raise_first(self, errors: dict[str, SiteRecoveryError]) -> None:
        for result in self.checks:
            if result.error is not None:
                raise result.error
        for group in self.order:
            for vm in group["vms"]:
                if vm["vm"] in errors:
                    raise errors[vm["vm"]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": True,
            "plan": self.plan.name,
            "operation": self.operation,
            "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks],
            "order": self.order,
            "bytes_to_move": sum(
                vm["plan"].get("bytes_to_move") or 0 for g in self.order for vm in g["vms"]
            ),
        }


def failover(
    ctx: Context,
    *,
    name: str,
    type: str,
    point: str = "latest",
    sync: str = "delta",
    threads: int | None = None,
    create_vm: bool = False,
    submit: Submit,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Fail every VM of plan ``name`` over (or back: ``planned`` on committed VMs)."""
    if point not in PLAN_SELECTORS:
        raise InvalidInput(
            field="point",
            reason=f"a plan picks each VM's point by rule: one of {', '.join(PLAN_SELECTORS)}",
        )
    plan = ctx.store.get_plan(name=name)
    run = PlanRun(plan, f"{type}-failover")
    _plan_rules(ctx, run, failback=_is_failback(ctx, plan, type))
    points = _points(ctx, run, point) if type in ("test", "unplanned") else {}
    errors: dict[str, SiteRecoveryError] = {}
    for index, group in enumerate(plan.groups, start=1):
        entry = _group_entry(index, group.to_dict()["actions"])
        for vm in group.vms:
            selected = points.get(vm, point)
            if isinstance(selected, SiteRecoveryError):
                errors[vm] = selected
                entry["vms"].append(_refused(vm, selected))
                continue
            request = single.FailoverRequest(
                vm=vm, type=type, point=selected, sync=sync,
                threads=threads, create_vm=create_vm, together=tuple(plan.vms),
            )  # fmt: skip
            entry["vms"].append(_plan_vm(ctx, run, request, errors))
        run.order.append(entry)
    kinds = {c["kind"] for c in run.children}
    if kinds == {"failback"}:
        run.operation = "failback"
    operation = f"plan-{run.operation}"
    two_phase = sync == "delta" and "failback" in kinds
    return _finish(ctx, run, errors, operation, submit, dry_run, two_phase=two_phase)


def commit(ctx: Context, *, name: str, submit: Submit, dry_run: bool = False) -> dict[str, Any]:
    return _each(ctx, name, "commit", submit, dry_run)


def reprotect(ctx: Context, *, name: str, submit: Submit, dry_run: bool = False) -> dict[str, Any]:
    return _each(ctx, name, "reprotect", submit, dry_run)


def cleanup_test(
    ctx: Context, *, name: str, submit: Submit, dry_run: bool = False
) -> dict[str, Any]:
    return _each(ctx, name, "cleanup-test", submit, dry_run)


def _each(ctx: Context, name: str, operation: str, submit: Submit, dry_run: bool) -> dict[str, Any]:
    """Commit, reprotect or clean up every VM of the plan (in parallel: no order)."""
    plan = ctx.store.get_plan(name=name)
    run = PlanRun(plan, operation)
    run.checks.append(check("the plan holds VMs", lambda: _not_empty(plan)))
    errors: dict[str, SiteRecoveryError] = {}
    entry = _group_entry(1, [])
    for vm in plan.vms:
        entry["vms"].append(_plan_simple(ctx, run, operation, vm, errors))
    run.order.append(entry)
    return _finish(ctx, run, errors, f"plan-{operation}", submit, dry_run, two_phase=False)


def _finish(
    ctx: Context,
    run: PlanRun,
    errors: dict[str, SiteRecoveryError],
    operation: str,
    submit: Submit,
    dry_run: bool,
    *,
    two_phase: bool,
) -> dict[str, Any]:
    if dry_run:
        return run.to_dict()
    run.raise_first(errors)
    from siterecovery.jobs.plan_flow import submit_plan

    job = submit_plan(ctx, submit, run, operation=operation, two_phase=two_phase)
    return {"job": job.id, "kind": operation, "plan": run.to_dict()}


def _group_entry(index: int, actions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"group": index, "actions": actions, "vms": []}


def _plan_vm(
    ctx: Context,
    run: PlanRun,
    request: single.FailoverRequest,
    errors: dict[str, SiteRecoveryError],
) -> dict[str, Any]:
    """One VM's single-VM failover plan (its checks, point, bytes) and child job."""
    try:
        request = request.validated()
        kind, plan = single.plan_failover(ctx, ctx.store.get_item(vm=request.vm), request)
    except SiteRecoveryError as error:
        errors[request.vm] = error
        return _refused(request.vm, error)
    _note_error(plan, errors)
    if plan.ok:
        run.children.append(
            {
                "vm": request.vm,
                "kind": kind,
                "group": len(run.order) + 1,
                "params": single.job_params(kind, request, plan),
            }
        )
    return {"vm": request.vm, "kind": kind, "plan": plan.to_dict()}


def _plan_simple(
    ctx: Context, run: PlanRun, operation: str, vm: str, errors: dict[str, SiteRecoveryError]
) -> dict[str, Any]:
    planners = {
        "commit": single.plan_commit,
        "reprotect": single.plan_reprotect,
        "cleanup-test": single.plan_cleanup_test,
    }
    try:
        plan = planners[operation](ctx, ctx.store.get_item(vm=vm))
    except SiteRecoveryError as error:
        errors[vm] = error
        return _refused(vm, error)
    _note_error(plan, errors)
    if plan.ok:
        run.children.append({"vm": vm, "kind": operation, "group": 1, "params": {"vm": vm}})
    return {"vm": vm, "kind": operation, "plan": plan.to_dict()}


def _refused(vm: str, error: SiteRecoveryError) -> dict[str, Any]:
    failed = Check("VM can be planned", error)
    document = {
        "ok": False,
        "preconditions": [failed.to_dict()],
        "failed_preconditions": [failed.to_dict()],
        "bytes_to_move": 0,
    }
    return {"vm": vm, "kind": None, "plan": document}


def _note_error(plan: Plan, errors: dict[str, SiteRecoveryError]) -> None:
    for result in plan.checks:
        if result.error is not None:
            errors.setdefault(plan.vm, result.error)
            return


# The plan's own rules ------------------------------------------------------------


def _plan_rules(ctx: Context, run: PlanRun, *, failback: bool) -> None:
    plan = run.plan
    run.checks.append(check("the plan holds VMs", lambda: _not_empty(plan)))
    operation = "fail back" if failback else "fail over"
    run.checks.append(
        check(
            "every VM has a recovery point",
            lambda: _every_vm_has_a_point(ctx, plan, operation),
        )
    )


def _not_empty(plan: RecoveryPlan) -> None:
    if not plan.vms:
        raise PlanEmpty(plan=plan.name)


def _every_vm_has_a_point(ctx: Context, plan: RecoveryPlan, operation: str) -> None:
    """The seed: no plan fails over (or back) until every VM has a recovery point."""
    missing = [vm for vm in plan.vms if not ctx.store.list_points(vm=vm)]
    if missing:
        raise PlanWithoutPoints(plan=plan.name, operation=operation, vms=missing)


def _is_failback(ctx: Context, plan: RecoveryPlan, type: str) -> bool:
    items = [ctx.store.find_item(vm=vm) for vm in plan.vms]
    return type == "planned" and any(
        i is not None and i.state in (ItemState.COMMITTED, ItemState.INCONSISTENT) for i in items
    )


def _points(ctx: Context, run: PlanRun, selector: str) -> dict[str, str | SiteRecoveryError]:
    """Each VM's point by the seed's rules: ``latest`` (latest processed): every VM
    its own latest point, a group member its latest independent one;
    ``latest-app-consistent``: a VM alone its latest app-consistent point, a
    replication group its latest common app-consistent point."""
    chosen: dict[str, str | SiteRecoveryError] = {}
    for vm in run.plan.vms:
        item = ctx.store.find_item(vm=vm)
        group = ctx.store.group_of(vm=vm)
        if item is None or group is None or selector != "latest-app-consistent":
            continue
        found = _common_point(ctx, item, group.name)
        site = single.recovery_site(item)
        kind = f"common app-consistent (group {group.name})"
        chosen[vm] = found.id if found else NoRecoveryPoint(vm=vm, kind=kind, site=site)
    return chosen


def _common_point(ctx: Context, item: Item, group_name: str) -> RecoveryPoint | None:
    from siterecovery.replication.group import newest_common

    group = ctx.store.get_group(name=group_name)
    site = single.recovery_site(item)
    points = newest_common(ctx, group, site, kind=PointType.APP_CONSISTENT)
    return points.get(item.vm) if points else None
