"""Routes: replication groups and recovery plans (definitions and operations)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import Field

from siterecovery.api.deps import Ctx, Runtime
from siterecovery.api.models import Body, Duration
from siterecovery.domain.values import parse_duration
from siterecovery.services import groups, plans

router = APIRouter()


class GroupIn(Body):
    name: str
    vms: list[str]
    common_interval: Duration = 300.0


class MembersIn(Body):
    vms: list[str]


class PlanIn(Body):
    name: str
    description: str = ""


class PlanVmsIn(Body):
    group: int = Field(1, ge=1)
    vms: list[str]


class ActionIn(Body):
    group: int = Field(1, ge=1)
    name: str
    kind: str
    when: str = "before"
    command: str | None = None
    instructions: str | None = None
    timeout: Duration = 300.0


class PlanFailoverIn(Body):
    type: str
    point: str = "latest"
    sync: str = "delta"
    threads: int | None = None
    create_vm: bool = False
    dry_run: bool = False


class DryRunIn(Body):
    dry_run: bool = False


@router.get("/groups")
def list_groups(ctx: Ctx) -> list[dict[str, Any]]:
    return groups.list_groups(ctx)


@router.post("/groups", status_code=201)
def create_group(ctx: Ctx, body: GroupIn) -> dict[str, Any]:
    every = parse_duration("common_interval", body.common_interval)
    return groups.create_group(ctx, name=body.name, vms=body.vms, common_interval=every)


@router.get("/groups/{name}")
def show_group(ctx: Ctx, name: str) -> dict[str, Any]:
    return groups.show_group(ctx, name=name)


@router.post("/groups/{name}/members")
def add_members(ctx: Ctx, name: str, body: MembersIn) -> dict[str, Any]:
    return groups.add_members(ctx, name=name, vms=body.vms)


@router.post("/groups/{name}/remove")
def remove_members(ctx: Ctx, name: str, body: MembersIn) -> dict[str, Any]:
    return groups.remove_members(ctx, name=name, vms=body.vms)


@router.delete("/groups/{name}")
def delete_group(ctx: Ctx, name: str) -> dict[str, Any]:
    return groups.delete_group(ctx, name=name)


@router.post("/groups/{name}/point")
def common_point(ctx: Ctx, name: str) -> dict[str, Any]:
    return groups.take_common_point(ctx, name=name)


@router.get("/plans")
def list_plans(ctx: Ctx) -> list[dict[str, Any]]:
    return plans.list_plans(ctx)


@router.post("/plans", status_code=201)
def create_plan(ctx: Ctx, body: PlanIn) -> dict[str, Any]:
    return plans.create_plan(ctx, name=body.name, description=body.description)


@router.get("/plans/{name}")
def show_plan(ctx: Ctx, name: str) -> dict[str, Any]:
    return plans.show_plan(ctx, name=name)


@router.delete("/plans/{name}")
def delete_plan(ctx: Ctx, name: str) -> dict[str, Any]:
    return plans.delete_plan(ctx, name=name)


@router.post("/plans/{name}/vms")
def add_vms(ctx: Ctx, name: str, body: PlanVmsIn) -> dict[str, Any]:
    return plans.add_vms(ctx, name=name, group=body.group, vms=body.vms)


@router.delete("/plans/{name}/vms/{vm}")
def remove_vm(ctx: Ctx, name: str, vm: str) -> dict[str, Any]:
    return plans.remove_vm(ctx, name=name, vm=vm)


@router.post("/plans/{name}/actions")
def add_action(ctx: Ctx, name: str, body: ActionIn) -> dict[str, Any]:
    return plans.add_action(
        ctx, name=name, group=body.group, action=body.name, kind=body.kind, when=body.when,
        command=body.command, instructions=body.instructions,
        timeout=parse_duration("timeout", body.timeout),
    )  # fmt: skip


@router.post("/plans/{name}/failover", status_code=202)
def plan_failover(ctx: Ctx, runtime: Runtime, name: str, body: PlanFailoverIn) -> dict[str, Any]:
    return plans.failover(
        ctx, name=name, type=body.type, point=body.point, sync=body.sync, threads=body.threads,
        create_vm=body.create_vm, submit=runtime.submit, dry_run=body.dry_run,
    )  # fmt: skip


@router.post("/plans/{name}/commit", status_code=202)
def plan_commit(ctx: Ctx, runtime: Runtime, name: str, body: DryRunIn | None = None) -> Any:
    return plans.commit(ctx, name=name, submit=runtime.submit, dry_run=bool(body and body.dry_run))


@router.post("/plans/{name}/reprotect", status_code=202)
def plan_reprotect(ctx: Ctx, runtime: Runtime, name: str, body: DryRunIn | None = None) -> Any:
    dry_run = bool(body and body.dry_run)
    return plans.reprotect(ctx, name=name, submit=runtime.submit, dry_run=dry_run)


@router.post("/plans/{name}/cleanup-test", status_code=202)
def plan_cleanup(ctx: Ctx, runtime: Runtime, name: str, body: DryRunIn | None = None) -> Any:
    dry_run = bool(body and body.dry_run)
    return plans.cleanup_test(ctx, name=name, submit=runtime.submit, dry_run=dry_run)
