"""The recovery-plan job: one parent workflow, one child job per VM.

Boot group by boot group: the group's *before* actions, then its VMs' jobs
started together (each the ordinary single-VM workflow, under its own job id),
a wait until every one of them succeeded, then its *after* actions. A failed
child or action stops the plan before the next group; the items of VMs whose
jobs never started are released. The parent's progress is the sum of its
children's.

A failback with delta sync runs in two phases across the plan: every VM's
phase 1 at once, then the parent waits in ``awaiting-completion``; ``complete``
on the parent lets each boot group in turn stop, send its last changes and
start (the seed's order, in reverse direction).

A manual action pauses the parent in ``awaiting-action`` until ``job resume``.
Waits are DBOS messages, so they survive a daemon restart.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from dbos import DBOS, SetWorkflowID

from siterecovery.context import Context
from siterecovery.domain.errors import ActionFailed, ChildJobFailed, JobCancelled, JobNotFound
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import Job, JobState, utcnow
from siterecovery.domain.recovery import Action, ActionKind
from siterecovery.jobs import control
from siterecovery.jobs.common import step
from siterecovery.jobs.runtime import context, job_scope, new_job_id
from siterecovery.services import ownership

if TYPE_CHECKING:
    from siterecovery.services.plans import PlanRun

POLL = 0.25
OUTPUT_TAIL = 8192


def submit_plan(
    ctx: Context, submit: Callable[..., Job], run: PlanRun, *, operation: str, two_phase: bool
) -> Job:
    """Mark every VM's item as owned by its (future) child job, then start the parent."""
    groups = _spec(run, two_phase)
    children = [c for g in groups for c in g["vms"]]
    ownership.take_all(ctx, {c["vm"]: c["job"] for c in children})  # all or none
    for child in children:
        if child["kind"] == "reprotect":
            ctx.store.update_item(vm=child["vm"], state=ItemState.REPROTECTING, last_error=None)
    params = {
        "plan": run.plan.name,
        "operation": operation,
        "groups": groups,
        "two_phase": two_phase,
    }
    try:
        return submit(plan_workflow, kind=operation, vm=None, params=params)
    except BaseException:
        for child in children:
            ownership.release(ctx, child["vm"], child["job"])
            if child["kind"] == "reprotect":
                ctx.store.update_item(vm=child["vm"], state=ItemState.COMMITTED)
        raise


def _spec(run: PlanRun, two_phase: bool) -> list[dict[str, Any]]:
    """The boot groups with each VM's child job (kind, id, params) and actions."""
    groups = []
    for entry in run.order:
        vms = [
            {**child, "job": new_job_id(), "phase1": two_phase and child["kind"] == "failback"}
            for child in run.children
            if child["group"] == entry["group"]
        ]
        groups.append({"group": entry["group"], "actions": entry["actions"], "vms": vms})
    return groups


@DBOS.workflow(name="plan")
def plan_workflow(
    job_id: str, plan: str, operation: str, groups: list[dict[str, Any]], two_phase: bool
) -> None:
    children = [c for g in groups for c in g["vms"]]
    with job_scope(job_id, on_exit=lambda: _release_unstarted(children)):
        step(job_id, "children", lambda: _record_children(job_id, plan, children))
        if two_phase:
            _phase1_everywhere(job_id, children)
        for group in groups:
            _boot_group(job_id, plan, operation, group, children)


def _record_children(job_id: str, plan: str, children: list[dict[str, Any]]) -> dict[str, Any]:
    found = {c["vm"]: c["job"] for c in children}
    context().store.merge_job_result(job_id=job_id, plan=plan, children=found)
    return {"children": found}


def _phase1_everywhere(job_id: str, children: list[dict[str, Any]]) -> None:
    first = [c for c in children if c["phase1"]]
    for child in first:
        _start_child(job_id, child)
    _wait(job_id, first, children, until=JobState.AWAITING_COMPLETION, name="phase1-all-vms")
    store = context().store
    store.update_job(job_id=job_id, state=JobState.AWAITING_COMPLETION)
    try:
        control.wait_for(job_id, control.COMPLETE)
    except JobCancelled:
        _cancel_children(job_id, children)
        raise
    store.update_job(job_id=job_id, state=JobState.RUNNING)


def _boot_group(
    job_id: str,
    plan: str,
    operation: str,
    group: dict[str, Any],
    children: list[dict[str, Any]],
) -> None:
    index = group["group"]
    actions = [Action.from_dict(a) for a in group["actions"]]
    environment = {"plan": plan, "operation": operation, "group": index, "vms": group["vms"]}
    for action in (a for a in actions if a.when.value == "before"):
        _run_action(job_id, index, action, environment)
    for child in group["vms"]:
        if child["phase1"]:
            control.send(child["job"], control.COMPLETE)
        else:
            _start_child(job_id, child)
    _wait(job_id, group["vms"], children, until=JobState.SUCCEEDED, name=f"group-{index}")
    for action in (a for a in actions if a.when.value == "after"):
        _run_action(job_id, index, action, environment)


# Children ------------------------------------------------------------------------


def _start_child(job_id: str, child: dict[str, Any]) -> None:
    """Record the child's job and start its workflow (both idempotent by job id)."""
    from siterecovery.services.failover import workflows

    step(job_id, f"start {child['vm']}", lambda: _record_child(job_id, child))
    with SetWorkflowID(child["job"]):
        DBOS.start_workflow(workflows()[child["kind"]], child["job"], **child["params"])


def _record_child(parent: str, child: dict[str, Any]) -> dict[str, Any]:
    store = context().store
    if _job_or_none(child["job"]) is None:
        now = utcnow()
        params = {**child["params"], "parent": parent}
        job = Job(child["job"], child["kind"], child["vm"], JobState.QUEUED, now, now)
        store.add_job(job=replace(job, params=params))
    return {"job": child["job"], "kind": child["kind"], "vm": child["vm"]}


def _wait(
    job_id: str,
    waited: list[dict[str, Any]],
    children: list[dict[str, Any]],
    *,
    until: JobState,
    name: str,
) -> None:
    """Wait (a durable step) until every ``waited`` child reaches ``until``;
    on a cancel of the parent, cancel the children and raise JobCancelled; on a
    child that failed, raise ChildJobFailed."""
    outcome = step(job_id, name, lambda: _poll(job_id, waited, children, until))
    if outcome.get("cancel"):
        _cancel_children(job_id, children)
        raise JobCancelled(job=job_id)
    failed = outcome.get("failed")
    if failed:
        raise ChildJobFailed(**failed)


def _poll(
    job_id: str, waited: list[dict[str, Any]], children: list[dict[str, Any]], until: JobState
) -> dict[str, Any]:
    store = context().store
    while True:
        jobs = {c["job"]: _job_or_none(c["job"]) for c in children}
        _sum_progress(job_id, jobs)
        if store.cancel_requested(job_id=job_id):
            return {"cancel": True}
        mine = [(c, jobs[c["job"]]) for c in waited]
        for child, job in mine:
            if job is not None and job.state.finished and job.state is not JobState.SUCCEEDED:
                return {"failed": _failure(child, job)}
        if all(job is not None and job.state is until for _, job in mine):
            return {"states": {c["vm"]: until.value for c, _ in mine}}
        time.sleep(POLL)


def _job_or_none(job_id: str) -> Job | None:
    """The job, or None when it was never recorded (its child has not started)."""
    try:
        return context().store.get_job(job_id=job_id)
    except JobNotFound:
        return None


def _failure(child: dict[str, Any], job: Job) -> dict[str, Any]:
    reason = (job.error or {}).get("message", "no error recorded")
    return {"vm": child["vm"], "job": job.id, "state": job.state.value, "reason": reason}


def _sum_progress(job_id: str, jobs: dict[str, Job | None]) -> None:
    known = [j for j in jobs.values() if j is not None]
    context().store.update_job(
        job_id=job_id,
        bytes_done=sum(j.bytes_done for j in known),
        bytes_total=sum(j.bytes_total for j in known),
        rate=round(sum(j.rate for j in known if j.state is JobState.RUNNING), 1),
    )


def _cancel_children(job_id: str, children: list[dict[str, Any]]) -> None:
    """Cancel every unfinished child, then wait for them to stop. Which children
    run is a step's recorded result, so a replay sends the same messages."""
    running = step(job_id, "cancel-requested", lambda: _request_cancel(children))["jobs"]
    for child in running:
        control.send(child, control.CANCEL)
    step(job_id, "cancel-vms", lambda: _await_finished(children))


def _request_cancel(children: list[dict[str, Any]]) -> dict[str, Any]:
    store = context().store
    running = [c["job"] for c in children if (j := _job_or_none(c["job"])) and not j.state.finished]
    for child in running:
        store.update_job(job_id=child, cancel_requested=True)
    return {"jobs": running}


def _await_finished(children: list[dict[str, Any]]) -> dict[str, Any]:
    while True:
        jobs = [_job_or_none(c["job"]) for c in children]
        if all(j is None or j.state.finished for j in jobs):
            return {"cancelled": [c["vm"] for c in children]}
        time.sleep(POLL)


def _release_unstarted(children: list[dict[str, Any]]) -> None:
    """Items still owned by a child job that never started are free again."""
    ctx = context()
    for child in children:
        if _job_or_none(child["job"]) is not None:
            continue
        released = ctx.store.release_item(vm=child["vm"], owner=child["job"])
        if released and child["kind"] == "reprotect":
            ctx.store.update_item(vm=child["vm"], state=ItemState.COMMITTED)


# Actions -------------------------------------------------------------------------


def _run_action(job_id: str, index: int, action: Action, environment: dict[str, Any]) -> None:
    name = f"group-{index} {action.when.value} {action.name}"
    if action.kind is ActionKind.SCRIPT:
        step(job_id, name, lambda: _script(action, environment))
    else:
        _manual(job_id, name, action, index)


def _script(action: Action, environment: dict[str, Any]) -> dict[str, Any]:
    """Run the script; its exit code and output's tail go to the step. Raises
    ActionFailed on a non-zero exit or a timeout."""
    env = {
        **os.environ,
        "SR_PLAN": str(environment["plan"]),
        "SR_OPERATION": str(environment["operation"]),
        "SR_GROUP": str(environment["group"]),
        "SR_VMS": ",".join(c["vm"] for c in environment["vms"]),
        "SR_ACTION": action.name,
        "SR_WHEN": action.when.value,
    }
    started = time.monotonic()
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", action.command or ""],
            env=env, capture_output=True, timeout=action.timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as expired:
        output = _tail((expired.stdout or b"") + (expired.stderr or b""))
        raise ActionFailed(
            action=action.name, plan=environment["plan"],
            reason=f"timed out after {action.timeout:g} s", tail=output or "(none)",
        ) from None  # fmt: skip
    output = _tail(done.stdout + done.stderr)
    if done.returncode != 0:
        raise ActionFailed(
            action=action.name, plan=environment["plan"],
            reason=f"exit status {done.returncode}", tail=output or "(none)",
        )  # fmt: skip
    seconds = round(time.monotonic() - started, 3)
    return {"exit_code": 0, "seconds": seconds, "output": output, "command": action.command}


def _tail(output: bytes) -> str:
    return output[-OUTPUT_TAIL:].decode(errors="replace")


def _manual(job_id: str, name: str, action: Action, index: int) -> None:
    """Pause the plan until ``job resume`` (the portal's Resume button)."""
    store = context().store
    waiting = {"action": action.name, "group": index, "instructions": action.instructions}
    store.record_step(job_id=job_id, name=name, state="running", detail=waiting)
    store.merge_job_result(job_id=job_id, waiting_for=waiting)
    store.update_job(job_id=job_id, state=JobState.AWAITING_ACTION)
    try:
        control.wait_for(job_id, control.RESUME)
    except JobCancelled:
        store.record_step(job_id=job_id, name=name, state="cancelled")
        raise
    store.merge_job_result(job_id=job_id, waiting_for=None)
    store.update_job(job_id=job_id, state=JobState.RUNNING)
    store.record_step(job_id=job_id, name=name, state="succeeded", detail={"resumed": True})
