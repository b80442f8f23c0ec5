"""Routes: what the portal's buttons do, each one service call of the JSON API.

Every POST is signed in and CSRF-checked. A refusal (any SiteRecoveryError)
answers with its code and message where the user clicked; the services refuse
before any side effect, so nothing has changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response

from siterecovery.api.deps import Ctx, Runtime
from siterecovery.domain.errors import InvalidInput, SiteRecoveryError
from siterecovery.portal import render
from siterecovery.portal.pages import dialog_context
from siterecovery.portal.session import Session, posted_with_csrf
from siterecovery.services import failover, jobs, protection

router = APIRouter()
Posted = Annotated[Session, Depends(posted_with_csrf)]
Field = Annotated[str, Form()]


def act(request: Request, session: Session, body: Callable[[], str]) -> Response:
    """Run ``body`` (one service call); go where it says, or show its refusal."""
    try:
        target = body()
    except SiteRecoveryError as error:
        return render.refused(request, session, error)
    return render.redirect(request, target)


def whole_number(field: str, text: str) -> int | None:
    if not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(field=field, reason=f"'{text}' is not a whole number") from None


# Replicated items ------------------------------------------------------------


@router.post("/items")
def enable_replication(
    request: Request,
    ctx: Ctx,
    runtime: Runtime,
    session: Posted,
    vm: Field,
    to: Field,
    interval: Field = "30s",
    app_consistent_every: Field = "0",
    retention: Field = "24h",
) -> Response:
    def run() -> str:
        policy = protection.make_policy(
            interval=interval,
            app_consistent_every=whole_number("app-consistent-every", app_consistent_every) or 0,
            retention=retention,
        )
        answer = protection.protect(ctx, vm=vm, to=to, policy=policy, submit=runtime.submit)
        return f"/jobs/{answer['job']}"

    return act(request, session, run)


@router.post("/items/{vm}/commit")
def commit(request: Request, ctx: Ctx, runtime: Runtime, session: Posted, vm: str) -> Response:
    return act(
        request,
        session,
        lambda: "/jobs/" + failover.commit(ctx, vm=vm, submit=runtime.submit)["job"],
    )


@router.post("/items/{vm}/reprotect")
def reprotect(request: Request, ctx: Ctx, runtime: Runtime, session: Posted, vm: str) -> Response:
    return act(
        request,
        session,
        lambda: "/jobs/" + failover.reprotect(ctx, vm=vm, submit=runtime.submit)["job"],
    )


@router.post("/items/{vm}/cleanup-test")
def cleanup_test(
    request: Request, ctx: Ctx, runtime: Runtime, session: Posted, vm: str
) -> Response:
    return act(
        request,
        session,
        lambda: "/jobs/" + failover.cleanup_test(ctx, vm=vm, submit=runtime.submit)["job"],
    )


@router.post("/items/{vm}/disable")
def disable(request: Request, ctx: Ctx, session: Posted, vm: str) -> Response:
    return act(request, session, lambda: f"/items/{protection.disable(ctx, vm=vm)['vm']}")


# The failover dialog ---------------------------------------------------------


def failover_request(
    vm: str,
    type: Field = "planned",
    point: Field = "latest",
    point_id: Field = "",
    sync: Field = "delta",
    location: Field = "original",
    host: Field = "",
    create_vm: Field = "",
    threads: Field = "",
    key: Field = "",
) -> Callable[[], failover.FailoverRequest]:
    """The dialog's fields as a request (built late: a bad field is a refusal)."""

    def build() -> failover.FailoverRequest:
        original = location == "original"
        return failover.FailoverRequest(
            vm=vm,
            type=type,
            point=point_id if point == "chosen" else point,
            sync=sync,
            host=None if original or not host else host,
            create_vm=bool(create_vm) and not original,
            threads=whole_number("threads", threads),
            key=key or None,
        )

    return build


Dialog = Annotated[Callable[[], failover.FailoverRequest], Depends(failover_request)]


@router.post("/items/{vm}/failover/preview", response_class=HTMLResponse)
def preview(
    request: Request, ctx: Ctx, runtime: Runtime, session: Posted, vm: str, build: Dialog
) -> Response:
    """The dry-run plan of the dialog's choices; a whole dialog without htmx."""
    try:
        plan = failover.failover(ctx, build(), submit=runtime.submit, dry_run=True)
        if render.is_htmx(request):
            return render.page(request, session, "plan.html", {"plan": plan}, part=True)
        context = dialog_context(ctx, vm, build().type)
    except SiteRecoveryError as error:
        return render.refused(request, session, error)
    return render.page(request, session, "failover.html", {**context, "plan": plan})


@router.post("/items/{vm}/failover")
def start_failover(
    request: Request,
    ctx: Ctx,
    runtime: Runtime,
    session: Posted,
    vm: str,
    build: Dialog,
    confirm: Field = "",
) -> Response:
    def run() -> str:
        if not confirm:
            raise InvalidInput(field="confirm", reason="confirm the direction of the failover")
        started = failover.failover(ctx, build(), submit=runtime.submit)
        return f"/jobs/{started['job']}"

    return act(request, session, run)


# Jobs ------------------------------------------------------------------------


@router.post("/jobs/{job_id}/complete")
def complete(
    request: Request, ctx: Ctx, runtime: Runtime, session: Posted, job_id: str
) -> Response:
    def run() -> str:
        failover.complete(ctx, job_id=job_id, send=runtime.complete)
        return f"/jobs/{job_id}"

    return act(request, session, run)


@router.post("/jobs/{job_id}/cancel")
def cancel(request: Request, ctx: Ctx, runtime: Runtime, session: Posted, job_id: str) -> Response:
    def run() -> str:
        jobs.cancel_job(ctx, job_id=job_id, request_cancel=runtime.cancel)
        return f"/jobs/{job_id}"

    return act(request, session, run)


@router.post("/jobs/{job_id}/resume")
def resume(request: Request, ctx: Ctx, runtime: Runtime, session: Posted, job_id: str) -> Response:
    """A plan paused on a manual action (awaiting-action) goes on."""

    def run() -> str:
        jobs.resume_job(ctx, job_id=job_id, send=runtime.resume)
        return f"/jobs/{job_id}"

    return act(request, session, run)
