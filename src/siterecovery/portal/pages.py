"""Routes: the portal's pages, each read from the services the JSON API calls.

Every page has a live part (``?part=1``) that htmx polls, so states, progress
and RPO move without a reload.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from siterecovery.api.deps import Ctx
from siterecovery.context import Context
from siterecovery.domain.errors import JobNotFound, SiteRecoveryError
from siterecovery.portal import render, views
from siterecovery.portal.session import Session, signed_in
from siterecovery.services import failover, inventory, jobs, keys, protection

router = APIRouter()
Signed = Annotated[Session, Depends(signed_in)]


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, ctx: Ctx, session: Signed, part: bool = False) -> Response:
    items = protection.list_items(ctx)
    context = {
        "sites": [s.to_dict() for s in ctx.store.list_sites()],
        "hosts": [h.to_dict() for h in ctx.store.list_hosts()],
        "items": items,
        "counts": views.health_counts(items),
        "worst_rpo": views.worst_rpo(items),
        "running": views.running_jobs(jobs.list_jobs(ctx)),
    }
    return render.page(request, session, "overview.html", context, part=part)


@router.get("/items", response_class=HTMLResponse)
def items(
    request: Request, ctx: Ctx, session: Signed, part: bool = False, vm: str | None = None
) -> Response:
    listed = protection.list_items(ctx)
    context: dict[str, Any] = {"items": listed, "actions": views.item_actions}
    if not part:
        context.update(_enable_form(ctx, listed, chosen=vm))
    return render.page(request, session, "items.html", context, part=part)


def _enable_form(
    ctx: Context, listed: list[dict[str, Any]], *, chosen: str | None
) -> dict[str, Any]:
    """VMs that can be protected (never protected, or disabled) and the sites."""
    busy = {i["vm"] for i in listed if i["state"] != "disabled"}
    vms = [v for v in inventory.list_vms(ctx) if v["name"] not in busy]
    sites = [s.name for s in ctx.store.list_sites()]
    first = next((v for v in vms if v["name"] == chosen), vms[0] if vms else None)
    elsewhere = [s for s in sites if first is None or s != first["site"]]
    default_to = elsewhere[0] if elsewhere else None
    return {"unprotected": vms, "sites": sites, "chosen": chosen, "default_to": default_to}


@router.get("/items/{vm}", response_class=HTMLResponse)
def item(request: Request, ctx: Ctx, session: Signed, vm: str, part: bool = False) -> Response:
    try:
        shown = protection.show_item(ctx, vm=vm)
        points = protection.list_points(ctx, vm=vm)
    except SiteRecoveryError as error:
        return render.refused(request, session, error)
    context = {
        "item": shown,
        "actions": views.item_actions(shown),
        "points": list(reversed(points)),
        "timeline": views.timeline(points),
        "jobs": jobs.list_jobs(ctx, vm=vm)[:10],
    }
    return render.page(request, session, "item.html", context, part=part)


@router.get("/items/{vm}/failover", response_class=HTMLResponse)
def failover_dialog(
    request: Request, ctx: Ctx, session: Signed, vm: str, type: str = "planned"
) -> Response:
    try:
        context = dialog_context(ctx, vm, type)
    except SiteRecoveryError as error:
        return render.refused(request, session, error)
    return render.page(request, session, "failover.html", {**context, "plan": None})


def dialog_context(ctx: Context, vm: str, kind_of_request: str) -> dict[str, Any]:
    """What the failover dialog offers for ``vm``: direction, points, hosts, the key."""
    request = failover.FailoverRequest(vm=vm, type=kind_of_request).validated()
    found = ctx.store.get_item(vm=vm)
    kind = failover.failover_kind(found, request)
    recovery = failover.recovery_site(found)
    source, target = views.dialog_direction(found.to_dict(), kind, recovery)
    return {
        "item": protection.show_item(ctx, vm=vm),
        "type": request.type,
        "kind": kind,
        "title": "Failback" if kind == "failback" else views.TYPE_TITLES[request.type],
        "source": source,
        "target": target,
        "points": [p.to_dict() for p in reversed(ctx.store.list_points(vm=vm, site=recovery))],
        "point_choices": views.POINT_CHOICES,
        "sync_options": views.SYNC_OPTIONS,
        "hosts": [h.to_dict() for h in ctx.store.list_hosts(site=target)],
        "keys": views.key_choices(found.to_dict(), keys.list_keys(ctx)),
    }


@router.get("/jobs", response_class=HTMLResponse)
def job_list(request: Request, ctx: Ctx, session: Signed, part: bool = False) -> Response:
    return render.page(request, session, "jobs.html", {"jobs": jobs.list_jobs(ctx)}, part=part)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, ctx: Ctx, session: Signed, job_id: str, part: bool = False) -> Response:
    try:
        shown = jobs.show_job(ctx, job_id=job_id)
    except SiteRecoveryError as error:
        return render.refused(request, session, error)
    context = {
        "job": shown,
        "percent": views.percent(shown["bytes_done"], shown["bytes_total"]),
        "waiting_for": (shown.get("result") or {}).get("waiting_for"),
        "children": [_child(ctx, child) for child in views.child_jobs(shown)],
    }
    return render.page(request, session, "job.html", context, part=part)


def _child(ctx: Context, child: dict[str, Any]) -> dict[str, Any]:
    """A plan job's child job as it is now (a job not started yet has no record)."""
    try:
        return {**jobs.show_job(ctx, job_id=child["job"]), "group": child["group"]}
    except JobNotFound:
        return {**child, "id": child["job"], "state": None, "bytes_total": 0}
