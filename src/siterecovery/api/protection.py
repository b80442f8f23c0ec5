"""Routes: replicated items, recovery points, jobs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from siterecovery.api.deps import Ctx, Runtime
from siterecovery.api.models import Body, Duration, Size
from siterecovery.replication.scheduler import replicate_now
from siterecovery.services import images, jobs, protection

router = APIRouter()


class ProtectIn(Body):
    vm: str
    to: str
    interval: Duration = "30s"
    app_consistent_every: int = 0
    retention: Duration = "24h"
    threads: int = 4
    max_rate: Size = 0
    verify_points: bool = False
    compress: str = "none"
    """``none`` or ``zstd``: the payloads' compression on the wire between sites."""
    key: str | None = None
    """A vault key sealing the transfers in flight (on top of TLS); replicas at rest
    are not encrypted by it."""


class PolicyIn(Body):
    """A policy change; every field as ``GET /items/{vm}`` answers it is accepted back.
    A field left out (or null) is kept, except ``key``: null or "" removes the key."""

    interval: Duration | None = None
    app_consistent_every: int | None = None
    retention: Duration | None = None
    threads: int | None = None
    max_rate: Size | None = None
    verify_points: bool | None = None
    compress: str | None = None
    key: str | None = None

    def changes(self) -> dict[str, Any]:
        """The fields to change: those given and not null, and ``key`` when given."""
        given = self.model_dump(include=self.model_fields_set)
        if "key" in given:
            given["key"] = given["key"] or None
        return {k: v for k, v in given.items() if v is not None or k == "key"}


class ReplicateIn(Body):
    app_consistent: bool | None = None


@router.post("/items", status_code=202)
def protect(ctx: Ctx, runtime: Runtime, body: ProtectIn) -> dict[str, Any]:
    policy = protection.make_policy(
        interval=body.interval,
        app_consistent_every=body.app_consistent_every,
        retention=body.retention,
        threads=body.threads,
        max_rate=body.max_rate,
        verify_points=body.verify_points,
        compress=body.compress,
        key=body.key,
        given=body.model_fields_set,
    )
    return protection.protect(ctx, vm=body.vm, to=body.to, policy=policy, submit=runtime.submit)


@router.get("/items")
def list_items(ctx: Ctx) -> list[dict[str, Any]]:
    return protection.list_items(ctx)


@router.get("/items/{vm}")
def show_item(ctx: Ctx, vm: str) -> dict[str, Any]:
    return protection.show_item(ctx, vm=vm)


@router.patch("/items/{vm}")
def update_policy(ctx: Ctx, vm: str, body: PolicyIn) -> dict[str, Any]:
    return protection.update_policy(ctx, vm=vm, **body.changes())


class DisableIn(Body):
    dry_run: bool = False


@router.post("/items/{vm}/disable")
def disable(ctx: Ctx, vm: str, body: DisableIn | None = None) -> dict[str, Any]:
    return protection.disable(ctx, vm=vm, dry_run=(body or DisableIn()).dry_run)


@router.post("/items/{vm}/replicate")
def replicate(ctx: Ctx, vm: str, body: ReplicateIn | None = None) -> dict[str, Any]:
    consistent = body.app_consistent if body else None
    return replicate_now(ctx, vm, app_consistent=consistent).to_dict()


@router.get("/items/{vm}/points")
def points(ctx: Ctx, vm: str) -> list[dict[str, Any]]:
    return protection.list_points(ctx, vm=vm)


class ExportIn(Body):
    format: str
    """raw, qcow2, vhdx, vpc (VHD), vmdk or vmdk-stream (streamOptimized)."""
    to: str
    """An absolute path at the point's site, not there yet."""


@router.post("/items/{vm}/points/{point}/export", status_code=201)
def export_point(ctx: Ctx, vm: str, point: str, body: ExportIn) -> dict[str, Any]:
    return images.export_point(ctx, vm=vm, point=point, fmt=body.format, to=body.to)


@router.get("/jobs")
def list_jobs(ctx: Ctx, vm: str | None = None) -> list[dict[str, Any]]:
    return jobs.list_jobs(ctx, vm=vm)


@router.get("/jobs/{job_id}")
def show_job(ctx: Ctx, job_id: str) -> dict[str, Any]:
    return jobs.show_job(ctx, job_id=job_id)


@router.get("/jobs/{job_id}/wait")
def wait_job(ctx: Ctx, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    return jobs.wait_job(ctx, job_id=job_id, timeout=min(timeout, 300.0)).to_dict()


@router.post("/jobs/{job_id}/cancel")
def cancel_job(ctx: Ctx, runtime: Runtime, job_id: str) -> dict[str, Any]:
    return jobs.cancel_job(ctx, job_id=job_id, request_cancel=runtime.cancel)


@router.post("/jobs/{job_id}/resume")
def resume_job(ctx: Ctx, runtime: Runtime, job_id: str) -> dict[str, Any]:
    return jobs.resume_job(ctx, job_id=job_id, send=runtime.resume)
