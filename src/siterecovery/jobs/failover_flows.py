"""Workflows of failover, failback, commit, reprotect and drills.

Every step observes whether its effect already exists before acting (a VM
already created, already stopped, a view already frozen with the job's tag…),
so DBOS can re-run an interrupted step after a crash.
"""

from __future__ import annotations

import time
from typing import Any

from dbos import DBOS

from siterecovery.domain.errors import JobCancelled, SiteRecoveryError
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import Item, JobState, Vm, failure, utcnow
from siterecovery.jobs.runtime import ProgressReporter, context, job_scope, run_step
from siterecovery.points.chain import ReplicaChain
from siterecovery.replication import failback as data
from siterecovery.replication.cycle import PassOptions, run_pass
from siterecovery.services.context import Context
from siterecovery.services.failover import home_of

CONTROL = "control"
COMPLETE, CANCEL = "complete", "cancel"
WAIT_SECONDS = 7 * 24 * 3600.0


def _item(vm: str) -> Item:
    return context().store.get_item(vm=vm)


def _release(vm: str) -> None:
    context().store.merge_tracking(vm=vm, busy=None)


def _cancel_check(reporter: ProgressReporter, job_id: str) -> Any:
    def cancelled() -> bool:
        if reporter.cancelled():
            raise JobCancelled(job=job_id)
        return False

    return cancelled


def _vm_at(ctx: Context, name: str, site: str) -> Vm | None:
    found = ctx.store.find_vms(name=name, site=site)
    return found[0] if found else None


def _side(ctx: Context, vm: Vm) -> data.Side:
    site = ctx.store.get_site(name=vm.site)
    return data.Side(site, vm, ctx.provider(site))


def _stop(ctx: Context, vm: Vm) -> dict[str, Any]:
    side = _side(ctx, vm)
    side.provider.stop_vm(side.site, vm)
    guest_state = getattr(side.provider, "guest_state", None)
    state = guest_state(side.site, vm) if callable(guest_state) else {}
    return {"stopped": f"{vm.name}@{vm.site}", "acknowledged_seq": state.get("seq")}


def _start(ctx: Context, vm: Vm) -> dict[str, Any]:
    side = _side(ctx, vm)
    side.provider.start_vm(side.site, vm)
    return {"started": f"{vm.name}@{vm.site}", "host": vm.host}


def _point_bases(ctx: Context, item: Item, point_id: str) -> dict[str, Any]:
    point = next(p for p in ctx.store.list_points(vm=item.vm) if p.id == point_id)
    site = ctx.store.get_site(name=point.site)
    provider = ctx.provider(site)
    return {d: provider.replica_dir(site, item.vm, d) / f for d, f in point.files.items()}


def _create_on_point(
    ctx: Context, item: Item, point_id: str, host: str, *, name: str, checkpoint: str
) -> Vm:
    """A VM at the standby site whose disks are overlays on the point's chain files."""
    source = _vm_at(ctx, item.vm, item.active_site) or ctx.store.find_vms(name=item.vm)[0]
    vm = Vm(
        name=name,
        site=item.standby_site,
        host=host,
        os=source.os,
        disks=source.disks,
        nics=source.nics,
        cpus=source.cpus,
        memory_mib=source.memory_mib,
        workload=source.workload,
    )
    existing = _vm_at(ctx, name, item.standby_site)
    if existing is not None:
        return existing
    site = ctx.store.get_site(name=item.standby_site)
    provider = ctx.provider(site)
    provider.create_vm(site, vm, bases=_point_bases(ctx, item, point_id), checkpoint=checkpoint)
    ctx.store.add_vm(vm=vm)
    return vm


def _delete_vm(ctx: Context, name: str, site_name: str) -> None:
    vm = _vm_at(ctx, name, site_name)
    if vm is None:
        return
    site = ctx.store.get_site(name=site_name)
    ctx.provider(site).delete_vm(site, vm)
    ctx.store.delete_vm(name=name, site=site_name)


def _switch(ctx: Context, item: Item, kind: str, **failover: Any) -> dict[str, Any]:
    """The VM now runs at the standby site: swap the item's direction."""
    if item.state is not ItemState.FAILED_OVER or item.active_site != failover["to"]:
        ctx.store.update_item(
            vm=item.vm,
            active_site=item.standby_site,
            standby_site=item.active_site,
            state=ItemState.FAILED_OVER,
            last_error=None,
        )
    hosts = ctx.store.get_tracking(vm=item.vm).get("hosts") or {}
    ctx.store.merge_tracking(
        vm=item.vm,
        failover={"kind": kind, **failover},
        hosts={**hosts, failover["to"]: failover["host"]},
        resume=None,
    )
    return {"state": ItemState.FAILED_OVER.value, "active_site": failover["to"]}


# Unplanned and planned failover ---------------------------------------------


@DBOS.workflow(name="unplanned-failover")
def unplanned_failover_workflow(job_id: str, vm: str, point: str, host: str) -> None:
    """Start the VM at the other site on a recovery point (no copy first)."""
    with job_scope(job_id, on_error=lambda exc: _failed(vm, exc), on_exit=lambda: _release(vm)):
        _step(job_id, "stop-source", lambda: _stop_source_best_effort(vm))
        _start_on_point(job_id, vm, point, host, "unplanned")


def _failed(vm: str, exc: BaseException) -> None:
    context().store.update_item(vm=vm, last_error=failure(exc))


def _stop_source_best_effort(vm: str) -> dict[str, Any]:
    """An unplanned failover stops the source if it can still be reached."""
    ctx = context()
    item = _item(vm)
    if item.state is ItemState.FAILED_OVER:
        return {"skipped": "re-run: the source is already the old side"}
    source = _vm_at(ctx, vm, item.active_site)
    if source is None:
        return {"stopped": None, "reason": "the source VM is gone"}
    try:
        return _stop(ctx, source)
    except (SiteRecoveryError, OSError) as exc:
        return {"stopped": None, "reason": str(exc)}


def _start_on_point(job_id: str, vm: str, point: str, host: str, kind: str) -> None:
    ctx = context()
    item = _item(vm)
    if item.state is ItemState.FAILED_OVER:
        # Re-run with another point: the previous failed-over VM goes first.
        _step(job_id, "remove-previous-failover", lambda: _remove_previous(vm))
        item = _item(vm)
    checkpoint = "fo" + job_id[1:9]
    target = _step(
        job_id,
        "create-target-vm",
        lambda: _create_on_point(ctx, item, point, host, name=vm, checkpoint=checkpoint).to_dict(),
    )
    _step(job_id, "start-target-vm", lambda: _start(ctx, _vm_at(ctx, vm, target["site"])))  # type: ignore[arg-type]
    last = ctx.store.get_tracking(vm=vm).get("last_checkpoint") or {}
    source_checkpoint = last.get("tag") if last.get("point") == point else None
    _step(
        job_id,
        "switch-direction",
        lambda: _switch(
            ctx,
            item,
            kind,
            point=point,
            host=host,
            to=item.standby_site,
            came_from=item.active_site,
            source_checkpoint=checkpoint,
            target_checkpoint=source_checkpoint,
        ),
    )


def _remove_previous(vm: str) -> dict[str, Any]:
    ctx = context()
    item = _item(vm)
    _delete_vm(ctx, vm, item.active_site)
    ctx.store.update_item(
        vm=vm,
        active_site=item.standby_site,
        standby_site=item.active_site,
        state=ItemState.PROTECTED,
    )
    return {"deleted": f"{vm}@{item.active_site}"}


@DBOS.workflow(name="planned-failover")
def planned_failover_workflow(job_id: str, vm: str, host: str) -> None:
    """Stop the source cleanly, replicate its last changes, start the VM at the other site."""
    with job_scope(job_id, on_error=lambda exc: _failed(vm, exc), on_exit=lambda: _release(vm)):
        ctx = context()
        item = _item(vm)
        source = _vm_at(ctx, vm, item.active_site)
        assert source is not None
        stopped = _step(job_id, "stop-source", lambda: _stop(ctx, source))
        final = _step(job_id, "final-replication", lambda: _final_pass(job_id, vm))
        ctx.store.merge_job_result(
            job_id=job_id,
            zero_data_loss={
                "acknowledged_seq_at_stop": stopped.get("acknowledged_seq"),
                "point": final["point"]["id"],
            },
        )
        _start_on_point(job_id, vm, final["point"]["id"], host, "planned")


def _final_pass(job_id: str, vm: str) -> dict[str, Any]:
    reporter = ProgressReporter(job_id)
    options = PassOptions(tag="f" + job_id[1:11], progress=reporter)
    with context().item_lock(vm):
        return run_pass(context(), vm, options).to_dict()


# Failback ----------------------------------------------------------------------


@DBOS.workflow(name="failback")
def failback_workflow(
    job_id: str, vm: str, host: str, sync: str, create_vm: bool, threads: int | None
) -> None:
    """Planned failover toward the other site with a data sync (delta or full)."""

    def on_error(exc: BaseException) -> None:
        context().store.update_item(vm=vm, state=ItemState.INCONSISTENT, last_error=failure(exc))

    with job_scope(job_id, on_error=on_error, on_exit=lambda: _release(vm)):
        prepared = _step(
            job_id, "prepare-target", lambda: _prepare_target(job_id, vm, host, create_vm)
        )
        move_threads = threads or _item(vm).policy.threads
        if sync == "delta":
            _delta(job_id, vm, prepared, move_threads)
        else:
            _full(job_id, vm, prepared, move_threads)
        item = _item(vm)
        _step(job_id, "switch-direction", lambda: _switch_failback(job_id, item, host))


def _prepare_target(job_id: str, vm: str, host: str, create_vm: bool) -> dict[str, Any]:
    """The target VM exists (or is created blank), is stopped and marked inconsistent."""
    ctx = context()
    item = _item(vm)
    site = ctx.store.get_site(name=item.standby_site)
    provider = ctx.provider(site)
    target = _vm_at(ctx, vm, item.standby_site)
    created = False
    if target is None:
        source = _vm_at(ctx, vm, item.active_site)
        assert source is not None and create_vm
        target = Vm(**{**_vm_fields(source), "site": site.name, "host": host})
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


def _vm_fields(vm: Vm) -> dict[str, Any]:
    return {f: getattr(vm, f) for f in Vm.__dataclass_fields__}


def _sides(vm: str) -> tuple[data.Side, data.Side]:
    ctx = context()
    item = _item(vm)
    source = _vm_at(ctx, vm, item.active_site)
    target = _vm_at(ctx, vm, item.standby_site)
    assert source is not None and target is not None
    return _side(ctx, source), _side(ctx, target)


def _movement(job_id: str, vm: str, tag: str, threads: int) -> data.Movement:
    reporter = ProgressReporter(job_id)
    return data.Movement(
        context(),
        vm,
        tag,
        threads,
        progress=reporter,
        cancelled=_cancel_check(reporter, job_id),
        max_rate=_item(vm).policy.max_rate,
    )


def _delta(job_id: str, vm: str, prepared: dict[str, Any], threads: int) -> None:
    ctx = context()
    tag1 = _resumable_tag(vm, "p1", job_id)
    phase1 = _step(
        job_id,
        "phase1-sync",
        lambda: _timed(
            lambda: data.delta_phase1(_movement(job_id, vm, tag1, threads), *_sides(vm), prepared)
        ),
    )
    ctx.store.update_item(vm=vm, state=ItemState.AWAITING_COMPLETION)
    ctx.store.update_job(job_id=job_id, state=JobState.AWAITING_COMPLETION)
    _wait_for_complete(job_id)
    ctx.store.update_item(vm=vm, state=ItemState.FINALIZING)
    ctx.store.update_job(job_id=job_id, state=JobState.RUNNING)
    prediction = _step(job_id, "predict-phase2", lambda: _predict(vm, phase1))
    started = _step(
        job_id, "stop-source", lambda: {"at": time.time(), **_stop(ctx, _sides(vm)[0].vm)}
    )
    tag2 = _resumable_tag(vm, "p2", job_id)
    phase2 = _step(
        job_id,
        "phase2-sync",
        lambda: _timed(
            lambda: data.delta_phase2(_movement(job_id, vm, tag2, threads), *_sides(vm), phase1)
        ),
    )
    done = _step(job_id, "start-target", lambda: {"at": time.time(), **_start_target(vm)})
    _record_downtime(job_id, prediction, phase2, started, done)


def _full(job_id: str, vm: str, prepared: dict[str, Any], threads: int) -> None:
    ctx = context()
    started = _step(
        job_id, "stop-source", lambda: {"at": time.time(), **_stop(ctx, _sides(vm)[0].vm)}
    )
    if not prepared["created"]:
        _step(job_id, "replace-target-disks", lambda: _replace_target(vm))
    tag = _resumable_tag(vm, "fd", job_id)
    copied = _step(
        job_id,
        "full-download",
        lambda: _timed(
            lambda: data.full_download(_movement(job_id, vm, tag, threads), *_sides(vm))
        ),
    )
    done = _step(job_id, "start-target", lambda: {"at": time.time(), **_start_target(vm)})
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
    return _start(ctx, target.vm)


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
    target = _vm_at(ctx, item.vm, item.standby_site)
    ctx.store.merge_tracking(vm=item.vm, failback_tags=None)
    if target is not None and target.host != host:
        ctx.store.delete_vm(name=target.name, site=target.site)
        ctx.store.add_vm(vm=Vm(**{**_vm_fields(target), "host": host}))
    return _switch(
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


def _wait_for_complete(job_id: str) -> None:
    """Durably wait for ``complete JOB`` (or a cancel) — survives a daemon restart."""
    while True:
        message = DBOS.recv(CONTROL, timeout_seconds=WAIT_SECONDS)
        if message == COMPLETE:
            return
        if message == CANCEL:
            raise JobCancelled(job=job_id)


def send_control(job_id: str, message: str) -> None:
    DBOS.send(job_id, message, topic=CONTROL)


# Commit and reprotect -------------------------------------------------------------


@DBOS.workflow(name="commit")
def commit_workflow(job_id: str, vm: str) -> None:
    """End the failover; after a failback, delete the VM left at the other site."""
    with job_scope(job_id, on_error=lambda exc: _failed(vm, exc), on_exit=lambda: _release(vm)):
        _step(job_id, "commit", lambda: _commit(vm))


def _commit(vm: str) -> dict[str, Any]:
    ctx = context()
    item = _item(vm)
    deleted = None
    if item.active_site == home_of(context(), item):
        _delete_vm(ctx, vm, item.standby_site)
        deleted = f"{vm}@{item.standby_site}"
    ctx.store.update_item(vm=vm, state=ItemState.COMMITTED, last_error=None)
    return {"state": ItemState.COMMITTED.value, "deleted": deleted}


@DBOS.workflow(name="reprotect")
def reprotect_workflow(job_id: str, vm: str) -> None:
    """Replicate from where the VM runs to the other site, from a common base."""

    def on_error(exc: BaseException) -> None:
        context().store.update_item(vm=vm, state=ItemState.COMMITTED, last_error=failure(exc))

    with job_scope(job_id, on_error=on_error, on_exit=lambda: _release(vm)):
        _step(job_id, "adopt-base", lambda: _adopt_base(vm))
        report = _step(job_id, "initial-sync", lambda: _initial_pass(job_id, vm))
        context().store.merge_job_result(job_id=job_id, initial_sync=report)
        _step(job_id, "enable-replication", lambda: _enable(vm))


def _adopt_base(vm: str) -> dict[str, Any]:
    """A stopped VM at the target site becomes the base of the new replica chain."""
    ctx = context()
    item = _item(vm)
    old = _vm_at(ctx, vm, item.standby_site)
    if old is None:
        return {"base": "the existing replica chain" if _has_chain(ctx, item) else None}
    site = ctx.store.get_site(name=item.standby_site)
    provider = ctx.provider(site)
    seq = int(ctx.store.get_tracking(vm=vm).get("next_seq", 1))
    chains = {d.name: provider.replica_dir(site, vm, d.name) for d in old.disks}
    for chain in chains.values():
        ReplicaChain(chain, 0).discard_partials()
    provider.adopt_disks(site, old, chains, seq)
    ctx.store.delete_vm(name=vm, site=site.name)
    ctx.store.merge_tracking(vm=vm, next_seq=seq + 1)
    return {"base": f"VM {vm} at {site.name}", "file": f"p{seq:06d}.qcow2"}


def _has_chain(ctx: Context, item: Item) -> bool:
    site = ctx.store.get_site(name=item.standby_site)
    vm = _vm_at(ctx, item.vm, item.active_site)
    provider = ctx.provider(site)
    return vm is not None and any(
        ReplicaChain(provider.replica_dir(site, item.vm, d.name), d.size).head() for d in vm.disks
    )


def _initial_pass(job_id: str, vm: str) -> dict[str, Any]:
    reporter = ProgressReporter(job_id)
    options = PassOptions(
        tag=job_id, initial=True, progress=reporter, cancelled=_cancel_check(reporter, job_id)
    )
    with context().item_lock(vm):
        return run_pass(context(), vm, options).to_dict()


def _enable(vm: str) -> dict[str, Any]:
    context().store.update_item(
        vm=vm, state=ItemState.PROTECTED, last_cycle=utcnow(), last_error=None
    )
    context().store.merge_tracking(vm=vm, failover=None)
    return {"state": ItemState.PROTECTED.value}


# Drills ---------------------------------------------------------------------------


@DBOS.workflow(name="test-failover")
def test_failover_workflow(job_id: str, vm: str, point: str, host: str, switch: str) -> None:
    """Start a copy of the VM at the recovery site on an isolated switch; replication goes on."""
    with job_scope(job_id, on_exit=lambda: _release(vm)):
        ctx = context()
        ctx.store.merge_tracking(vm=vm, pinned=[point])
        item = _item(vm)
        name = f"{vm}-test"
        started = time.monotonic()
        created = _step(
            job_id, "create-test-vm", lambda: _drill_vm(ctx, item, point, host, name, switch)
        )
        _step(job_id, "start-test-vm", lambda: _start(ctx, _vm_at(ctx, name, item.standby_site)))  # type: ignore[arg-type]
        points = ctx.store.list_points(vm=vm)
        chosen = next(p for p in points if p.id == point)
        ctx.store.merge_tracking(
            vm=vm, drill={"vm": name, "site": item.standby_site, "point": point, "job": job_id}
        )
        ctx.store.merge_job_result(
            job_id=job_id,
            drill={
                "vm": created["name"],
                "switch": switch,
                "rto_seconds": round(time.monotonic() - started, 3),
                "rpo_seconds": round((utcnow() - chosen.time).total_seconds(), 3),
            },
        )


def _drill_vm(
    ctx: Context, item: Item, point: str, host: str, name: str, switch: str
) -> dict[str, Any]:
    vm = _create_on_point(ctx, item, point, host, name=name, checkpoint="drill")
    if vm.nics != (switch,):
        ctx.store.delete_vm(name=vm.name, site=vm.site)
        vm = Vm(**{**_vm_fields(vm), "nics": (switch,)})
        ctx.store.add_vm(vm=vm)
    return vm.to_dict()


@DBOS.workflow(name="cleanup-test")
def cleanup_test_workflow(job_id: str, vm: str) -> None:
    with job_scope(job_id):
        _step(job_id, "delete-test-vm", lambda: _cleanup(vm))


def _cleanup(vm: str) -> dict[str, Any]:
    ctx = context()
    drill = ctx.store.get_tracking(vm=vm).get("drill") or {}
    if drill:
        _delete_vm(ctx, drill["vm"], drill["site"])
    ctx.store.merge_tracking(vm=vm, drill=None, pinned=[])
    return {"deleted": f"{drill.get('vm')}@{drill.get('site')}" if drill else None}


# Steps ------------------------------------------------------------------------------


def _step(job_id: str, name: str, body: Any) -> Any:
    """Run ``body`` as the durable step ``name`` of the job (recorded in DBOS and
    in the job's steps)."""
    return DBOS.run_step({"name": name}, lambda: run_step(job_id, name, body))
