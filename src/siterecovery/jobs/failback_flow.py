"""The failback workflow: a planned failover toward the other site with a data
sync (``delta``: two phases around ``complete``; ``full``: one download).

Steps are idempotent; phase tags survive a cancelled job so that re-running
the failback resumes its sync (see ``replication/failback.py``).
"""

from __future__ import annotations

import time
from typing import Any

from dbos import DBOS

from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import Item, JobState, Vm, failure
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
)
from siterecovery.jobs.runtime import ProgressReporter, context, job_scope
from siterecovery.replication import failback as data


@DBOS.workflow(name="failback")
def failback_workflow(
    job_id: str, vm: str, host: str, sync: str, create_vm: bool, threads: int | None
) -> None:
    """Planned failover toward the other site with a data sync (delta or full)."""

    def on_error(exc: BaseException) -> None:
        context().store.update_item(vm=vm, state=ItemState.INCONSISTENT, last_error=failure(exc))

    with job_scope(job_id, on_error=on_error, on_exit=lambda: release(vm)):
        prepared = step(
            job_id, "prepare-target", lambda: _prepare_target(job_id, vm, host, create_vm)
        )
        move_threads = threads or load_item(vm).policy.threads
        if sync == "delta":
            _delta(job_id, vm, prepared, move_threads)
        else:
            _full(job_id, vm, prepared, move_threads)
        item = load_item(vm)
        step(job_id, "switch-direction", lambda: _switch_failback(job_id, item, host))


def _prepare_target(job_id: str, vm: str, host: str, create_vm: bool) -> dict[str, Any]:
    """The target VM exists (or is created blank), is stopped and marked inconsistent."""
    ctx = context()
    item = load_item(vm)
    site = ctx.store.get_site(name=item.standby_site)
    provider = ctx.provider(site)
    target = vm_at(ctx, vm, item.standby_site)
    created = False
    if target is None:
        source = vm_at(ctx, vm, item.active_site)
        assert source is not None and create_vm
        target = Vm(**{**vm_fields(source), "site": site.name, "host": host})
        provider.create_vm(site, target)
        ctx.store.add_vm(vm=target)
        created = True
    provider.stop_vm(site, target)
    provider_set = getattr(provider, "set_inconsistent", None)
    if callable(provider_set):
        provider_set(site, target, True)
    ctx.store.update_item(vm=vm, state=ItemState.SYNCING)
    failover = ctx.store.get_tracking(vm=vm).get("failover") or {}
    return {
        "target": f"{vm}@{site.name}",
        "host": host,
        "created": created,
        "source_checkpoint": failover.get("source_checkpoint"),
        "target_checkpoint": failover.get("target_checkpoint"),
    }


def _sides(vm: str) -> tuple[data.Side, data.Side]:
    ctx = context()
    item = load_item(vm)
    source = vm_at(ctx, vm, item.active_site)
    target = vm_at(ctx, vm, item.standby_site)
    assert source is not None and target is not None
    return side_of(ctx, source), side_of(ctx, target)


def _movement(job_id: str, vm: str, tag: str, threads: int) -> data.Movement:
    reporter = ProgressReporter(job_id)
    return data.Movement(
        context(),
        vm,
        tag,
        threads,
        progress=reporter,
        cancelled=cancel_check(reporter, job_id),
        max_rate=load_item(vm).policy.max_rate,
    )


def _delta(job_id: str, vm: str, prepared: dict[str, Any], threads: int) -> None:
    ctx = context()
    tag1 = _resumable_tag(vm, "p1", job_id)
    phase1 = step(
        job_id,
        "phase1-sync",
        lambda: _timed(
            lambda: data.delta_phase1(_movement(job_id, vm, tag1, threads), *_sides(vm), prepared)
        ),
    )
    ctx.store.update_item(vm=vm, state=ItemState.AWAITING_COMPLETION)
    ctx.store.update_job(job_id=job_id, state=JobState.AWAITING_COMPLETION)
    control.wait_for(job_id, control.COMPLETE)
    ctx.store.update_item(vm=vm, state=ItemState.FINALIZING)
    ctx.store.update_job(job_id=job_id, state=JobState.RUNNING)
    prediction = step(job_id, "predict-phase2", lambda: _predict(vm, phase1))
    started = step(
        job_id, "stop-source", lambda: {"at": time.time(), **stop_vm(ctx, _sides(vm)[0].vm)}
    )
    tag2 = _resumable_tag(vm, "p2", job_id)
    phase2 = step(
        job_id,
        "phase2-sync",
        lambda: _timed(
            lambda: data.delta_phase2(_movement(job_id, vm, tag2, threads), *_sides(vm), phase1)
        ),
    )
    done = step(job_id, "start-target", lambda: {"at": time.time(), **_start_target(vm)})
    _record_downtime(job_id, prediction, phase2, started, done)


def _full(job_id: str, vm: str, prepared: dict[str, Any], threads: int) -> None:
    ctx = context()
    started = step(
        job_id, "stop-source", lambda: {"at": time.time(), **stop_vm(ctx, _sides(vm)[0].vm)}
    )
    if not prepared["created"]:
        step(job_id, "replace-target-disks", lambda: _replace_target(vm))
    tag = _resumable_tag(vm, "fd", job_id)
    copied = step(
        job_id,
        "full-download",
        lambda: _timed(
            lambda: data.full_download(_movement(job_id, vm, tag, threads), *_sides(vm))
        ),
    )
    done = step(job_id, "start-target", lambda: {"at": time.time(), **_start_target(vm)})
    prediction = {"predicted_bytes": None, "predicted_seconds": None}
    _record_downtime(job_id, prediction, copied, started, done)


def _replace_target(vm: str) -> dict[str, Any]:
    target = _sides(vm)[1]
    if context().store.get_tracking(vm=vm).get("resume"):
        return {"skipped": "a download of these disks is under way"}
    target.provider.replace_disks(target.site, target.vm)
    return {"replaced": [d.name for d in target.vm.disks]}


def _resumable_tag(vm: str, phase: str, job_id: str) -> str:
    """The tag of a sync phase: kept across re-runs of a cancelled failback so
    the new job resumes the old one's view and offsets."""
    ctx = context()
    tags = ctx.store.get_tracking(vm=vm).get("failback_tags") or {}
    if phase not in tags:
        tags = {**tags, phase: phase + job_id[1:9]}
        ctx.store.merge_tracking(vm=vm, failback_tags=tags)
    return str(tags[phase])


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


def _predict(vm: str, phase1: dict[str, Any]) -> dict[str, Any]:
    """Phase 2's bytes (the phase-1 checkpoint's dirty count) and time at phase 1's rate."""
    pending = data.pending_bytes(_sides(vm)[0], phase1["checkpoint"])
    rate = phase1["bytes_read"] / phase1["seconds"] if phase1["seconds"] > 0 else 0.0
    seconds = pending / rate if rate > 0 else None
    return {
        "predicted_bytes": pending,
        "predicted_seconds": round(seconds, 3) if seconds is not None else None,
    }


def _start_target(vm: str) -> dict[str, Any]:
    ctx = context()
    target = _sides(vm)[1]
    setter = getattr(target.provider, "set_inconsistent", None)
    if callable(setter):
        setter(target.site, target.vm, False)
    return start_vm(ctx, target.vm)


def _record_downtime(
    job_id: str,
    prediction: dict[str, Any],
    sync_report: dict[str, Any],
    stopped: dict[str, Any],
    started: dict[str, Any],
) -> None:
    disks = sync_report["disks"]
    context().store.merge_job_result(
        job_id=job_id,
        phase2={
            **prediction,
            "bytes": sync_report["bytes"],
            "seconds": sync_report["seconds"],
            "downtime_seconds": round(started["at"] - stopped["at"], 3),
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


def _switch_failback(job_id: str, item: Item, host: str) -> dict[str, Any]:
    ctx = context()
    checkpoint = "fb" + job_id[1:9]
    target = vm_at(ctx, item.vm, item.standby_site)
    ctx.store.merge_tracking(vm=item.vm, failback_tags=None)
    if target is not None and target.host != host:
        ctx.store.delete_vm(name=target.name, site=target.site)
        ctx.store.add_vm(vm=Vm(**{**vm_fields(target), "host": host}))
    return switch_direction(
        ctx,
        item,
        "failback",
        point=None,
        host=host,
        to=item.standby_site,
        came_from=item.active_site,
        source_checkpoint=checkpoint,
        target_checkpoint=None,
    )
