"""Routes: recovery plans and replication groups, their pages and their buttons.

Each page reads, and each button calls, what the JSON API's ``api/recovery.py``
calls (``services/plans.py``, ``services/groups.py``). A plan operation opens a
dialog (point rule, data sync, confirmation) whose Preview is the plan's dry
run per boot group and VM; starting it goes to the parent job's page.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response

from siterecovery.api.deps import Ctx, Runtime
from siterecovery.context import Context
from siterecovery.domain.errors import InvalidInput, SiteRecoveryError
from siterecovery.domain.lifecycle import Operation
from siterecovery.jobs.runtime import JobRuntime
from siterecovery.portal import render, views
from siterecovery.portal.actions import Field, Posted, act, whole_number
from siterecovery.portal.session import Session, signed_in
from siterecovery.services import groups, inventory, jobs, plans, protection

router = APIRouter()
Signed = Annotated[Session, Depends(signed_in)]
Names = Annotated[list[str] | None, Form()]
SIMPLE = {  # the plan operations without a point or a direction to choose
    Operation.COMMIT: plans.commit,
    Operation.REPROTECT: plans.reprotect,
    Operation.CLEANUP_TEST: plans.cleanup_test,
}


# Pages -------------------------------------------------------------------------


@router.get("/plans", response_class=HTMLResponse)
def plan_list(request: Request, ctx: Ctx, session: Signed, part: bool = False) -> Response:
    context: dict[str, Any] = {"plans": plans.list_plans(ctx), "groups": groups.list_groups(ctx)}
    if not part:
        grouped = {vm for g in context["groups"] for vm in g["members"]}
        context["groupable"] = [
            i["vm"]
            for i in protection.list_items(ctx)
            if i["state"] != "disabled" and i["vm"] not in grouped
        ]
    return render.page(request, session, "plans.html", context, part=part)


@router.get("/plans/{name}", response_class=HTMLResponse)
def plan_page(
    request: Request, ctx: Ctx, session: Signed, name: str, part: bool = False
) -> Response:
    try:
        plan, members = _plan_and_members(ctx, name)
    except SiteRecoveryError as error:
        return render.refused(request, session, error)
    context: dict[str, Any] = {
        "plan": plan,
        "operations": views.plan_operations(name, members),
        "jobs": views.plan_jobs(jobs.list_jobs(ctx), name)[:5],
    }
    if not part:
        context["addable"] = _addable(ctx, plan)
        context["group_count"] = len(plan["groups"])
    return render.page(request, session, "recovery_plan.html", context, part=part)


@router.get("/plans/{name}/operations/{operation}", response_class=HTMLResponse)
def operation_dialog(
    request: Request, ctx: Ctx, session: Signed, name: str, operation: str
) -> Response:
    try:
        context = _dialog_context(ctx, name, operation)
    except SiteRecoveryError as error:
        return render.refused(request, session, error)
    return render.page(request, session, "plan_operation.html", {**context, "preview": None})


def _plan_and_members(ctx: Context, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The plan (``show_plan``) and the item documents of its protected VMs."""
    plan = plans.show_plan(ctx, name=name)
    items = {i["vm"]: i for i in protection.list_items(ctx) if i["state"] != "disabled"}
    return plan, [items[vm] for vm in plan["vms"] if vm in items]


def _addable(ctx: Context, plan: dict[str, Any]) -> list[str]:
    """The VMs a plan can take: every VM of the inventory but its own and the
    copies test failovers started."""
    drills = {i["drill"]["vm"] for i in protection.list_items(ctx) if i.get("drill")}
    names = {v["name"] for v in inventory.list_vms(ctx)}
    return sorted(names - drills - set(plan["vms"]))


def _dialog_context(ctx: Context, name: str, operation: str) -> dict[str, Any]:
    plan, members = _plan_and_members(ctx, name)
    return {
        "plan": plan,
        "chosen": views.plan_operation(name, operation, members),
        "directions": views.directions(members),
        "point_choices": views.POINT_CHOICES,
        "sync_options": views.SYNC_OPTIONS,
    }


# Buttons: a plan's definition --------------------------------------------------


@router.post("/plans")
def create_plan(
    request: Request, ctx: Ctx, session: Posted, name: Field = "", description: Field = ""
) -> Response:
    def run() -> str:
        plans.create_plan(ctx, name=name, description=description)
        return f"/plans/{name}"

    return act(request, session, run)


@router.post("/plans/{name}/vms")
def add_vm(
    request: Request, ctx: Ctx, session: Posted, name: str, vm: Field = "", group: Field = ""
) -> Response:
    def run() -> str:
        plans.add_vms(ctx, name=name, group=_required(group, "group"), vms=[vm] if vm else [])
        return f"/plans/{name}"

    return act(request, session, run)


@router.post("/plans/{name}/vms/{vm}/remove")
def remove_vm(request: Request, ctx: Ctx, session: Posted, name: str, vm: str) -> Response:
    def run() -> str:
        plans.remove_vm(ctx, name=name, vm=vm)
        return f"/plans/{name}"

    return act(request, session, run)


@router.post("/plans/{name}/actions")
def add_action(
    request: Request,
    ctx: Ctx,
    session: Posted,
    name: str,
    group: Field = "",
    action: Field = "",
    kind: Field = "script",
    when: Field = "before",
    command: Field = "",
    instructions: Field = "",
    timeout: Field = "300",
) -> Response:
    def run() -> str:
        plans.add_action(
            ctx, name=name, group=_required(group, "group"), action=action, kind=kind,
            when=when, command=command.strip() or None, instructions=instructions.strip() or None,
            timeout=float(_required(timeout, "timeout")),
        )  # fmt: skip
        return f"/plans/{name}"

    return act(request, session, run)


def _required(text: str, field: str) -> int:
    number = whole_number(field, text)
    if number is None:
        raise InvalidInput(field=field, reason="give a whole number")
    return number


# Buttons: a plan's operations ---------------------------------------------------


def _operate(
    ctx: Context,
    runtime: JobRuntime,
    name: str,
    chosen: views.PlanOperation,
    *,
    point: str,
    sync: str,
    dry_run: bool,
) -> dict[str, Any]:
    """The operation through the service the API calls: its dry run, or its job."""
    if chosen.failover_type is not None:
        return plans.failover(
            ctx, name=name, type=chosen.failover_type, point=point, sync=sync,
            submit=runtime.submit, dry_run=dry_run,
        )  # fmt: skip
    operate = SIMPLE[chosen.operation]
    return operate(ctx, name=name, submit=runtime.submit, dry_run=dry_run)


@router.post("/plans/{name}/operations/{operation}/preview", response_class=HTMLResponse)
def preview(
    request: Request,
    ctx: Ctx,
    runtime: Runtime,
    session: Posted,
    name: str,
    operation: str,
    point: Field = "latest",
    sync: Field = "delta",
) -> Response:
    """The plan's dry run for the dialog's choices; a whole dialog without htmx."""
    try:
        context = _dialog_context(ctx, name, operation)
        dry = _operate(ctx, runtime, name, context["chosen"], point=point, sync=sync, dry_run=True)
    except SiteRecoveryError as error:
        return render.refused(request, session, error)
    if render.is_htmx(request):
        return render.page(request, session, "plan_preview.html", {"preview": dry}, part=True)
    return render.page(request, session, "plan_operation.html", {**context, "preview": dry})


@router.post("/plans/{name}/operations/{operation}")
def start(
    request: Request,
    ctx: Ctx,
    runtime: Runtime,
    session: Posted,
    name: str,
    operation: str,
    point: Field = "latest",
    sync: Field = "delta",
    confirm: Field = "",
) -> Response:
    def run() -> str:
        chosen = _dialog_context(ctx, name, operation)["chosen"]
        if not confirm:
            raise InvalidInput(field="confirm", reason="confirm the operation on every VM")
        started = _operate(ctx, runtime, name, chosen, point=point, sync=sync, dry_run=False)
        return f"/jobs/{started['job']}"

    return act(request, session, run)


# Buttons: replication groups -----------------------------------------------------


@router.post("/groups")
def create_group(
    request: Request,
    ctx: Ctx,
    session: Posted,
    name: Field = "",
    vms: Names = None,
    common_interval: Field = "300",
) -> Response:
    def run() -> str:
        every = float(_required(common_interval, "common-interval"))
        groups.create_group(ctx, name=name, vms=vms or [], common_interval=every)
        return "/plans"

    return act(request, session, run)


@router.post("/groups/{name}/point")
def take_common_point(request: Request, ctx: Ctx, session: Posted, name: str) -> Response:
    def run() -> str:
        groups.take_common_point(ctx, name=name)
        return "/plans"

    return act(request, session, run)
