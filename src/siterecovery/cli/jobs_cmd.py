"""Commands ``jobs`` and ``job show|wait|cancel|resume``, and following a job until it settles.

A job settles when it is finished (``succeeded``, ``failed``, ``cancelled``)
or waits for the user (``awaiting-completion``, ``awaiting-action``). Following
one exits 0 when it succeeded or awaits the user, 1 otherwise (failed,
cancelled, or still running when ``--timeout`` ran out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from siterecovery.cli import render
from siterecovery.cli.client import READ_TIMEOUT, Client, segment
from siterecovery.cli.session import JsonOpt, Session, VaultOpt

POLL_SECONDS = 0.5
"""How often the progress bar asks for the job."""
LONG_POLL_SECONDS = 30.0
"""The longest one ``/jobs/{id}/wait`` request may block in the daemon."""

FINISHED = frozenset({"succeeded", "failed", "cancelled"})
AWAITING = frozenset({"awaiting-completion", "awaiting-action"})
GOOD = AWAITING | {"succeeded"}

app = typer.Typer(help="Show, wait for and cancel jobs.", no_args_is_help=True)

JobArg = Annotated[str, typer.Argument(metavar="ID", help="Job id.")]


def settled(job: render.Doc) -> bool:
    return job.get("state") in FINISHED | AWAITING


@dataclass(frozen=True, slots=True)
class Deadline:
    """A monotonic instant, or none (wait forever)."""

    at: float | None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def left(self, cap: float) -> float:
        """Seconds to wait next: at most ``cap``, 0 once passed."""
        if self.at is None:
            return cap
        return max(0.0, min(cap, self.at - time.monotonic()))


def watch(client: Client, job_id: str, deadline: Deadline) -> dict[str, Any]:
    """Poll the job every POLL_SECONDS under a progress bar until it settles."""
    with render.JobProgress() as bar:
        while True:
            job: dict[str, Any] = client.get(f"/jobs/{segment(job_id)}")
            bar.update(job)
            if settled(job) or deadline.passed():
                return job
            time.sleep(POLL_SECONDS)


def long_poll(client: Client, job_id: str, deadline: Deadline) -> dict[str, Any]:
    """Wait silently through ``/jobs/{id}/wait`` until the job settles."""
    while True:
        chunk = deadline.left(LONG_POLL_SECONDS)
        job: dict[str, Any] = client.get(
            f"/jobs/{segment(job_id)}/wait", read_timeout=chunk + READ_TIMEOUT, timeout=chunk
        )
        if settled(job) or deadline.passed():
            return job


def outcome(job: render.Doc) -> None:
    """Say how the followed job ended (errors on stderr)."""
    job_id, state = job.get("id"), job.get("state")
    if state == "succeeded":
        render.say(f"job {job_id} succeeded", style="green")
    elif state in AWAITING:
        actions = render.value_text(job.get("allowed_actions"))
        render.say(f"job {job_id} is {state}; allowed actions: {actions}", style="yellow")
    elif state in FINISHED:
        error = job.get("error") or {"code": "JOB_" + str(state).upper(), "message": ""}
        message = f"job {job_id} {state}: {error.get('message')}"
        render.print_error({**error, "message": message})
    else:
        render.warn(f"job {job_id} is still {state}; `siterecovery job wait {job_id}` goes on")


def follow(session: Session, job_id: str, *, timeout: float | None = None) -> None:
    """Wait for the job (bar without --json), print it, exit 1 unless it ended well."""
    deadline = Deadline.after(timeout)
    if session.json:
        job = long_poll(session.client, job_id, deadline)
    else:
        job = watch(session.client, job_id, deadline)
    session.emit(job, outcome)
    if job.get("state") not in GOOD:
        raise typer.Exit(1)


def started(session: Session, answer: dict[str, Any], *, wait: bool) -> None:
    """Report a job-starting answer ``{"job": ID, ...}``, or follow the job with ``wait``."""
    job_id = str(answer["job"])
    if wait:
        follow(session, job_id)
        return
    session.emit(answer, lambda _: render.say(f"job {job_id} started"))


def list_jobs(
    ctx: typer.Context,
    vm: Annotated[str | None, typer.Option("--vm", help="Only the jobs of this VM.")] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the jobs, newest first."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get("/jobs", vm=vm), render.jobs)


@app.command("show")
def show(
    ctx: typer.Context, job_id: JobArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """Show a job: state, progress, steps, error and result."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get(f"/jobs/{segment(job_id)}"), render.job)


@app.command("wait")
def wait(
    ctx: typer.Context,
    job_id: JobArg,
    timeout: Annotated[
        float | None, typer.Option("--timeout", metavar="S", help="Give up after S seconds.")
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Wait until a job finishes or awaits you (progress bar unless --json).

    Exit 0 if it succeeded or awaits an action, 1 if it failed, was cancelled
    or still runs after --timeout.
    """
    with Session.of(ctx, vault, json_out) as session:
        follow(session, job_id, timeout=timeout)


@app.command("cancel")
def cancel(
    ctx: typer.Context, job_id: JobArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """Ask a running job to stop (it stops between chunks; a sync resumes later)."""
    with Session.of(ctx, vault, json_out) as session:
        job = session.client.post(f"/jobs/{segment(job_id)}/cancel")
        session.emit(
            job, lambda doc: render.say(f"cancel of job {job_id} requested ({doc.get('state')})")
        )


@app.command("resume")
def resume(
    ctx: typer.Context,
    job_id: JobArg,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job.")] = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Resume a plan job paused on a manual action (awaiting-action): the action is done."""
    with Session.of(ctx, vault, json_out) as session:
        job = session.client.post(f"/jobs/{segment(job_id)}/resume")
        if wait:
            follow(session, job_id)
            return
        session.emit(job, render.job)
