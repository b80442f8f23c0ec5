"""Durable jobs on DBOS: one workflow per operation, one DBOS step per named step.

The vault's ``jobs`` table is what users see (state words, steps with times,
bytes, rate, errors, results); DBOS's system database (``dbos.sqlite`` next to
the vault, or PostgreSQL) is what makes a job survive a crash: on start,
:meth:`JobRuntime.start` launches DBOS, which re-runs every interrupted
workflow; completed steps return their recorded result and the interrupted
step runs again — our steps are idempotent and resume from progress they
persisted themselves.

Workflows reach the service context through :func:`context`, set once per
process; their arguments stay small and serialisable (job id, VM name).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dbos import DBOS, SetWorkflowID

from siterecovery.context import Context
from siterecovery.domain.errors import InternalError, JobCancelled, describe
from siterecovery.domain.model import Job, JobState, utcnow
from siterecovery.jobs import faults

APP_VERSION = "siterecovery-2"
"""Bumped when a workflow's parameters or steps change: DBOS recovers only the
workflows of its own version."""
T = TypeVar("T")

_context: Context | None = None
_dbos: DBOS | None = None


def context() -> Context:
    if _context is None:
        raise InternalError(detail="the job runtime is not started in this process")
    return _context


def new_job_id() -> str:
    return "j" + uuid.uuid4().hex[:12]


class JobRuntime:
    """Starts DBOS for a vault and submits jobs to it. One per process."""

    def __init__(self, ctx: Context, *, system_database_url: str | None = None) -> None:
        self.ctx = ctx
        self.url = system_database_url or f"sqlite:///{Path(ctx.vault_dir) / 'dbos.sqlite'}"

    def start(self) -> None:
        """Launch DBOS; interrupted workflows resume in the background."""
        global _context, _dbos
        _context = self.ctx
        from siterecovery.jobs import (  # noqa: F401  (registers the workflows)
            failback_flow,
            failover_flows,
            plan_flow,
            workflows,
        )

        _dbos = DBOS(
            config={
                "name": "siterecovery",
                "system_database_url": self.url,
                "log_level": "WARNING",
                "application_version": APP_VERSION,
            }
        )
        DBOS.launch()
        self.reconcile()

    def reconcile(self) -> dict[str, list[str]]:
        """After a crash: a job recorded but whose workflow never started (the
        process died between the two) is failed — nothing of it ran; items held
        by replication passes, synchronous operations or finished jobs of the
        previous process are freed. Running jobs keep their items (DBOS resumes
        them). Returns what was repaired."""
        store = self.ctx.store
        orphans: list[str] = []
        planned: list[str] = []
        for job in store.list_jobs(limit=1000):
            if job.state.finished:
                continue
            for group in job.params.get("groups") or []:  # a plan's future children
                planned.extend(child["job"] for child in group.get("vms", []))
            if job.params.get("parent"):
                continue  # the plan's workflow starts it (again) itself
            if job.state is JobState.QUEUED and DBOS.get_workflow_status(job.id) is None:
                error = InternalError(detail="the daemon stopped before this job started")
                store.update_job(job_id=job.id, state=JobState.FAILED, error=describe(error))
                orphans.append(job.id)
        freed = store.release_stale_owners(live_jobs=planned)
        return {"failed_unstarted_jobs": orphans, "freed_items": freed}

    def stop(self) -> None:
        global _context, _dbos
        DBOS.destroy(destroy_registry=False)
        _context = None
        _dbos = None

    def submit(
        self,
        workflow: Callable[..., Any],
        *,
        kind: str,
        vm: str | None,
        params: dict[str, Any],
        job_id: str | None = None,
    ) -> Job:
        """Record a queued job and start its workflow (its id is the job id)."""
        now = utcnow()
        job = Job(
            id=job_id or new_job_id(),
            kind=kind,
            vm=vm,
            state=JobState.QUEUED,
            created=now,
            updated=now,
            params=params,
        )
        self.ctx.store.add_job(job=job)
        with SetWorkflowID(job.id):
            DBOS.start_workflow(workflow, job.id, **params)
        return job

    def cancel(self, job_id: str) -> None:
        """Ask a job to stop: long steps poll the flag between chunks, and a job
        waiting for the user (awaiting-completion) gets a message."""
        self.ctx.store.update_job(job_id=job_id, cancel_requested=True)
        from siterecovery.jobs import control

        control.send(job_id, control.CANCEL)

    def complete(self, job_id: str) -> None:
        """Tell a job waiting in awaiting-completion to go on (phase 2)."""
        from siterecovery.jobs import control

        control.send(job_id, control.COMPLETE)

    def resume(self, job_id: str) -> None:
        """Tell a plan job paused on a manual action (awaiting-action) to go on."""
        from siterecovery.jobs import control

        control.send(job_id, control.RESUME)


@contextmanager
def job_scope(
    job_id: str,
    *,
    on_error: Callable[[BaseException], None] | None = None,
    on_exit: Callable[[], None] | None = None,
) -> Iterator[None]:
    """Mark the job running, then succeeded, failed or cancelled.

    ``on_error`` runs first on failure (e.g. to put the item in a safe state);
    ``on_exit`` runs in every case just before the final state is written (e.g.
    to release the item), so whoever sees the job finished sees it done.
    Errors are recorded on the job and not re-raised: the job table is the
    user's view and a failed job is a finished workflow.
    """
    store = context().store
    store.update_job(job_id=job_id, state=JobState.RUNNING)
    try:
        yield
    except BaseException as exc:
        if on_error is not None:
            on_error(exc)
        if on_exit is not None:
            on_exit()
        state = JobState.CANCELLED if isinstance(exc, JobCancelled) else JobState.FAILED
        store.update_job(job_id=job_id, state=state, error=describe(exc))
        if not isinstance(exc, Exception):
            raise
        return
    if on_exit is not None:
        on_exit()
    store.update_job(job_id=job_id, state=JobState.SUCCEEDED)


def run_step(job_id: str, name: str, body: Callable[[], T]) -> T:
    """Run ``body`` as the job step ``name`` and record its state and times."""
    store = context().store
    kind = store.get_job(job_id=job_id).kind if faults.enabled() else ""
    faults.at_step(kind, name, "before")
    store.record_step(job_id=job_id, name=name, state="running")
    try:
        result = body()
    except JobCancelled:
        store.record_step(job_id=job_id, name=name, state="cancelled")
        raise
    except BaseException as exc:
        store.record_step(job_id=job_id, name=name, state="failed", detail={"error": describe(exc)})
        raise
    detail = result if isinstance(result, dict) else {}
    store.record_step(job_id=job_id, name=name, state="succeeded", detail=detail)
    faults.at_step(kind, name, "after")
    return result


class ProgressReporter:
    """Feeds sync progress into the job row at most a few times per second.

    Thread-safe; ``cancelled()`` polls the job's cancel flag at the same pace.
    """

    def __init__(self, job_id: str, *, interval: float = 0.5) -> None:
        self.job_id = job_id
        self.interval = interval
        self._lock = threading.Lock()
        self._last_write = 0.0
        self._last_poll = 0.0
        self._cancel = False
        self._start = time.monotonic()
        self._base = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_write < self.interval and done < total:
                return
            self._last_write = now
        elapsed = max(now - self._start, 1e-6)
        context().store.update_job(
            job_id=self.job_id,
            bytes_done=self._base + done,
            bytes_total=self._base + total,
            rate=round(done / elapsed, 1),
        )

    def cancelled(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._cancel or now - self._last_poll < self.interval:
                return self._cancel
            self._last_poll = now
        self._cancel = context().store.cancel_requested(job_id=self.job_id)
        return self._cancel
