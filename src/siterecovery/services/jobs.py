"""Jobs as users see them: list, show, wait, cancel."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import JobFinished, OperationNotAllowed
from siterecovery.domain.model import Job, JobState

WAIT_STATES = (JobState.AWAITING_COMPLETION, JobState.AWAITING_ACTION)


def list_jobs(ctx: Context, *, vm: str | None = None) -> list[dict[str, Any]]:
    return [job.to_dict() for job in ctx.store.list_jobs(vm=vm)]


def show_job(ctx: Context, *, job_id: str) -> dict[str, Any]:
    return ctx.store.get_job(job_id=job_id).to_dict()


def wait_job(ctx: Context, *, job_id: str, timeout: float = 60.0, poll: float = 0.25) -> Job:
    """The job once finished or awaiting the user, or as it is after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        job = ctx.store.get_job(job_id=job_id)
        if job.state.finished or job.state in WAIT_STATES or time.monotonic() >= deadline:
            return job
        time.sleep(poll)


def cancel_job(ctx: Context, *, job_id: str, request_cancel: Any) -> dict[str, Any]:
    job = ctx.store.get_job(job_id=job_id)
    if job.state.finished:
        raise JobFinished(job=job_id, state=job.state.value, action="cancelled")
    request_cancel(job_id)
    return ctx.store.get_job(job_id=job_id).to_dict()


def resume_job(ctx: Context, *, job_id: str, send: Callable[[str], None]) -> dict[str, Any]:
    """Let a plan job paused on a manual action (``awaiting-action``) go on."""
    return release_wait(ctx, job_id=job_id, waiting=JobState.AWAITING_ACTION, send=send)


def release_wait(
    ctx: Context, *, job_id: str, waiting: JobState, send: Callable[[str], None]
) -> dict[str, Any]:
    """Tell a job waiting in state ``waiting`` to go on (``send``); the job once it
    left that state, so a caller reading it next never sees the wait it ended.

    Raises OperationNotAllowed (nothing sent) when the job is not in ``waiting``.
    """
    job = ctx.store.get_job(job_id=job_id)
    action = "complete" if waiting is JobState.AWAITING_COMPLETION else "resume"
    if job.state is not waiting:
        raise OperationNotAllowed(
            operation=action,
            vm=job.vm or f"job {job_id}",
            state=f"in job {job_id} {job.state.value}",
            allowed=", ".join(job.allowed_actions()) or "nothing (the job is finished)",
        )
    send(job_id)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        job = ctx.store.get_job(job_id=job_id)
        if job.state is not waiting:
            break
        time.sleep(0.05)
    return job.to_dict()
