"""The failback workflow: a planned failover toward the other site with a data
sync (``delta``: two phases around ``complete``; ``full``: one download).

Steps are idempotent; phase tags survive a cancelled job so that re-running
the failback resumes its sync (see ``replication/failback.py``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from dbos import DBOS

from siterecovery.domain.errors import TargetVmMissing
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import JobState, Vm, failure
from siterecovery.domain.tracking import FailoverState
from siterecovery.jobs import control
from siterecovery.jobs.common import (
    cancel_check,
    load_item,
    release,
    side_of,
    start_vm,
    step,
    stop_vm,
    switch_direction,
    vm_at,
    vm_fields,
    vm_required,
)
from siterecovery.jobs.runtime import ProgressReporter, context, job_scope
from siterecovery.replication import failback as data


@DBOS.workflow(name="failback")
def failback_workflow(
    job_id: str,
    vm: str,
    host: str,
    sync: str,
    create_vm: bool,
    threads: int | None,
    frm: str,
    to: str,
) -> None:
    """Planned failover from ``frm`` toward ``to`` with a data sync (delta or full)."""

    def on_error(exc: BaseException) -> None:
        context().store.update_item(vm=vm, state=ItemState.INCONSISTENT, last_error=failure(exc))

    with job_scope(job_id, on_error=on_error, on_exit=lambda: release(vm, job_id)):
        prepared = step(
            job_id,
            "prepare-target",
            lambda: _prepare_target(job_id, vm, host, create_vm, threads, frm, to),
        )
        if sync == "delta":
            _delta(job_id, vm, prepared)
        else:
            _full(job_id, vm, prepared)
        step(job_id, "switch-direction", lambda: _switch_failback(job_id, vm, host, frm, to))


def _prepare_target(
    job_id: str, vm: str, host: str, create_vm: bool, threads: int | None, frm: str, to: str
) -> dict[str, Any]:
    """The target VM exists (or is created blank), is stopped and marked inconsistent.

    Also fixes what the rest of the job uses (threads, the phases' tags), so a
    replay after a crash takes the same values: the tags are kept across re-runs
    of a failed failback, whose new job then resumes the old one's views.
    """
    ctx = context()
    site = ctx.site(to)
    target = vm_at(ctx, vm, to)
    created = False
    if target is None:
        source = vm_required(ctx, vm, frm)
        if not create_vm:
            raise TargetVmMissing(vm=vm, host=host, site=to)
        target = Vm(**{**vm_fields(source), "site": to, "host": host})
        site.create_vm(target)
        ctx.store.add_vm(vm=target)
        created = True
    site.stop_vm(target)
    site.set_inconsistent(target, True)
    ctx.store.update_item(vm=vm, state=ItemState.SYNCING)
    tracking = ctx.store.update_item_tracking(
        vm=vm,
        change=lambda t: replace(
            t, failback_tags={p: p + job_id[1:9] for p in PHASES} | dict(t.failback_tags)
        ),
    )
    failover = tracking.failover
    return {
        "target": f"{vm}@{to}",
        "host": host,
        "created": created,
        "source_checkpoint": failover.source_checkpoint if failover else None,
        "target_checkpoint": failover.target_checkpoint if failover else None,
        "threads": threads or load_item(vm).policy.threads,
        "tags": dict(tracking.failback_tags),
        "frm": frm,
        "to": to,
    }


PHASES = ("p1", "p2", "fd")


def _sides(vm: str, prepared: dict[str, Any]) -> tuple[data.Side, data.Side]:
    ctx = context()
    source = vm_required(ctx, vm, prepared["frm"])
    target = vm_required(ctx, vm, prepared["to"])
    return side_of(ctx, source), side_of(ctx, target)


def _movement(job_id: str, vm: str, prepared: dict[str, Any], phase: str) -> data.Movement:
    reporter = ProgressReporter(job_id)
    return data.Movement(
        context(),
        vm,
        str(prepared["tags"][phase]),
        int(prepared["threads"]),
        progress=reporter,
        cancelled=cancel_check(reporter, job_id),
        max_rate=load_item(vm).policy.max_rate,
        source_site=str(prepared["frm"]),
    )


def _delta(job_id: str, vm: str, prepared: dict[str, Any]) -> None:
    phase1 = step(job_id, "phase1-sync", lambda: _phase1(job_id, vm, prepared))
    control.wait_for(job_id, control.COMPLETE)
    prediction = step(job_id, "predict-phase2", lambda: _predict(job_id, vm, prepared, phase1))
    stopped = step(job_id, "stop-source", lambda: _stop_source(vm, prepared))
    phase2 = step(
        job_id,
        "phase2-sync",
        lambda: _timed(
            lambda: data.delta_phase2(
                _movement(job_id, vm, prepared, "p2"), *_sides(vm, prepared), phase1
            )
        ),
    )
    step(
        job_id,
        "start-target",
        lambda: _start_target(job_id, vm, prepared, prediction, phase2, stopped),
    )


def _phase1(job_id: str, vm: str, prepared: dict[str, Any]) -> dict[str, Any]:
    """Phase 1 (the source keeps running); then the job waits for ``complete``."""
    move = _movement(job_id, vm, prepared, "p1")
    report = _timed(lambda: data.delta_phase1(move, *_sides(vm, prepared), prepared))
    context().store.update_item(vm=vm, state=ItemState.AWAITING_COMPLETION)
    context().store.update_job(job_id=job_id, state=JobState.AWAITING_COMPLETION)
    return report


def _stop_source(vm: str, prepared: dict[str, Any]) -> dict[str, Any]:
    return stop_vm(context(), _sides(vm, prepared)[0].vm)


def _full(job_id: str, vm: str, prepared: dict[str, Any]) -> None:
    stopped = step(job_id, "stop-source", lambda: _stop_source(vm, prepared))
    if not prepared["created"]:
        step(job_id, "replace-target-disks", lambda: _replace_target(vm, prepared))
    copied = step(
        job_id,
        "full-download",
        lambda: _timed(
            lambda: data.full_download(_movement(job_id, vm, prepared, "fd"), *_sides(vm, prepared))
        ),
    )
    prediction = {"predicted_bytes": None, "predicted_seconds": None}
    step(
        job_id,
        "start-target",
        lambda: _start_target(job_id, vm, prepared, prediction, copied, stopped),
    )


def _replace_target(vm: str, prepared: dict[str, Any]) -> dict[str, Any]:
    target = _sides(vm, prepared)[1]
    if context().store.item_tracking(vm=vm).resume is not None:
        return {"skipped": "a download of these disks is under way"}
    target.site.replace_disks(target.vm)
    return {"replaced": [d.name for d in target.vm.disks]}


def _timed(body: Any) -> dict[str, Any]:
    """Run a data movement; its result with seconds and byte totals added."""
    started = time.monotonic()
    result = body()
    seconds = time.monotonic() - started
    disks = result["disks"].values()
    return {
        **result,
        "seconds": round(seconds, 3),
        "bytes": sum(int(d.get("bytes_written", 0)) for d in disks),
        "bytes_zeroed": sum(int(d.get("bytes_zeroed", 0)) for d in disks),
        "bytes_read": sum(int(d.get("bytes_read", 0)) for d in disks),
    }


def _predict(
    job_id: str, vm: str, prepared: dict[str, Any], phase1: dict[str, Any]
) -> dict[str, Any]:
    """``complete`` arrived: phase 2's bytes (the phase-1 checkpoint's dirty count)
    and its sync time at phase 1's rate, recorded before the source stops."""
    ctx = context()
    ctx.store.update_item(vm=vm, state=ItemState.FINALIZING)
    ctx.store.update_job(job_id=job_id, state=JobState.RUNNING)
    pending = data.pending_bytes(_sides(vm, prepared)[0], phase1["checkpoint"])
    rate = phase1["bytes_read"] / phase1["seconds"] if phase1["seconds"] > 0 else 0.0
    seconds = pending / rate if rate > 0 else None
    return {
        "predicted_bytes": pending,
        "predicted_seconds": round(seconds, 3) if seconds is not None else None,
    }


def _start_target(
    job_id: str,
    vm: str,
    prepared: dict[str, Any],
    prediction: dict[str, Any],
    sync_report: dict[str, Any],
    stopped: dict[str, Any],
) -> dict[str, Any]:
    """Clear the target's marker (the proof is in), start it, record the downtime."""
    ctx = context()
    target = _sides(vm, prepared)[1]
    target.site.set_inconsistent(target.vm, False)
    started = start_vm(ctx, target.vm)
    _record_downtime(job_id, prediction, sync_report, stopped, started)
    return started


def _record_downtime(
    job_id: str,
    prediction: dict[str, Any],
    sync_report: dict[str, Any],
    stopped: dict[str, Any],
    started: dict[str, Any],
) -> None:
    """Predicted vs measured, like with like: ``predicted_seconds`` is the sync
    time at phase 1's rate, compared with the measured ``seconds`` of the sync;
    ``downtime_seconds`` runs from the source stopped to the target started."""
    disks = sync_report["disks"]
    context().store.merge_job_result(
        job_id=job_id,
        phase2={
            **prediction,
            "bytes": sync_report["bytes"],
            "seconds": sync_report["seconds"],
            "downtime_seconds": round(started["at"] - stopped["at"], 3),
            "downtime": {
                "sync_seconds": sync_report["seconds"],
                "start_seconds": started.get("start_seconds"),
                "stop_seconds": stopped.get("stop_seconds"),
            },
        },
        integrity={
            "disks": {
                n: {"source_digest": d["source_digest"], "target_digest": d["target_digest"]}
                for n, d in disks.items()
            },
            "source_digest": ",".join(d["source_digest"] for d in disks.values()),
            "target_digest": ",".join(d["target_digest"] for d in disks.values()),
            "equal": all(d["source_digest"] == d["target_digest"] for d in disks.values()),
        },
    )


def _switch_failback(job_id: str, vm: str, host: str, frm: str, to: str) -> dict[str, Any]:
    ctx = context()
    checkpoint = "fb" + job_id[1:9]
    target = vm_at(ctx, vm, to)
    ctx.store.update_item_tracking(vm=vm, change=lambda t: replace(t, failback_tags={}))
    if target is not None and target.host != host:
        ctx.store.delete_vm(name=target.name, site=target.site)
        ctx.store.add_vm(vm=Vm(**{**vm_fields(target), "host": host}))
    failover = FailoverState(
        kind="failback",
        to=to,
        came_from=frm,
        point=None,
        host=host,
        source_checkpoint=checkpoint,
        target_checkpoint=None,
    )
    return switch_direction(ctx, vm, failover)
