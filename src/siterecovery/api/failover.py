"""Routes: failover, complete, commit, reprotect, drills, verify."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from siterecovery.api.deps import Ctx, Runtime
from siterecovery.api.models import Body
from siterecovery.services import failover as service
from siterecovery.services.verify import verify

router = APIRouter()


class FailoverIn(Body):
    type: str
    point: str = "latest"
    sync: str = "delta"
    host: str | None = None
    create_vm: bool = False
    switch: str | None = None
    threads: int | None = None
    key: str | None = None
    dry_run: bool = False


class DryRunIn(Body):
    dry_run: bool = False


@router.post("/items/{vm}/failover", status_code=202)
def failover(ctx: Ctx, runtime: Runtime, vm: str, body: FailoverIn) -> dict[str, Any]:
    fields = body.model_dump(exclude={"dry_run"})
    request = service.FailoverRequest(vm=vm, **fields)
    return service.failover(ctx, request, submit=runtime.submit, dry_run=body.dry_run)


@router.post("/items/{vm}/commit", status_code=202)
def commit(ctx: Ctx, runtime: Runtime, vm: str, body: DryRunIn | None = None) -> dict[str, Any]:
    dry_run = body.dry_run if body else False
    return service.commit(ctx, vm=vm, submit=runtime.submit, dry_run=dry_run)


@router.post("/items/{vm}/reprotect", status_code=202)
def reprotect(ctx: Ctx, runtime: Runtime, vm: str, body: DryRunIn | None = None) -> dict[str, Any]:
    dry_run = body.dry_run if body else False
    return service.reprotect(ctx, vm=vm, submit=runtime.submit, dry_run=dry_run)


@router.post("/items/{vm}/cleanup-test", status_code=202)
def cleanup_test(ctx: Ctx, runtime: Runtime, vm: str) -> dict[str, Any]:
    return service.cleanup_test(ctx, vm=vm, submit=runtime.submit)


@router.get("/items/{vm}/verify")
def verify_item(ctx: Ctx, vm: str) -> dict[str, Any]:
    return verify(ctx, vm=vm)


@router.post("/jobs/{job_id}/complete")
def complete(ctx: Ctx, runtime: Runtime, job_id: str) -> dict[str, Any]:
    """``job_id``: the waiting job's id, or its VM's name."""
    return service.complete(ctx, job_id=job_id, send=runtime.complete)


@router.post("/items/{vm}/complete")
def complete_item(ctx: Ctx, runtime: Runtime, vm: str) -> dict[str, Any]:
    """Complete the failback of ``vm`` that awaits completion."""
    return service.complete(ctx, job_id=vm, send=runtime.complete)
