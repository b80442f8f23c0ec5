"""Workflows of failover, failback, commit, reprotect and drills.

Every step observes whether its effect already exists before acting (a VM
already created, already stopped, a view already frozen with the job's tag…),
so DBOS can re-run an interrupted step after a crash.
"""

from __future__ import annotations

import time
from typing import Any

from dbos import DBOS

from siterecovery.domain.errors import SiteRecoveryError
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import Item, Vm, failure, utcnow
from siterecovery.jobs.common import (
    delete_vm,
    failed,
    initial_pass,
    load_item,
    release,
    start_vm,
    step,
    stop_vm,
    switch_direction,
    vm_at,
    vm_fields,
    vm_required,
)
from siterecovery.jobs.runtime import ProgressReporter, context, job_scope
from siterecovery.points.chain import ReplicaChain
from siterecovery.replication.cycle import PassOptions, run_pass
from siterecovery.services.context import Context
from siterecovery.services.failover import home_of


def _point_bases(ctx: Context, item: Item, point_id: str) -> dict[str, Any]:
    point = next(p for p in ctx.store.list_points(vm=item.vm) if p.id == point_id)
    site = ctx.store.get_site(name=point.site)
    provider = ctx.provider(site)
    return {d: provider.replica_dir(site, item.vm, d) / f for d, f in point.files.items()}


def _create_on_point(
    ctx: Context, item: Item, point_id: str, host: str, *, name: str, checkpoint: str
) -> Vm:
    """A VM at the standby site whose disks are overlays on the point's chain files."""
    source = vm_at(ctx, item.vm, item.active_site) or ctx.store.find_vms(name=item.vm)[0]
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
    existing = vm_at(ctx, name, item.standby_site)
    if existing is not None:
        return existing
    site = ctx.store.get_site(name=item.standby_site)
    provider = ctx.provider(site)
    provider.create_vm(site, vm, bases=_point_bases(ctx, item, point_id), checkpoint=checkpoint)
    ctx.store.add_vm(vm=vm)
    return vm


# Unplanned and planned failover ---------------------------------------------


@DBOS.workflow(name="unplanned-failover")
def unplanned_failover_workflow(job_id: str, vm: str, point: str, host: str) -> None:
    """Start the VM at the other site on a recovery point (no copy first)."""
    with job_scope(job_id, on_error=lambda exc: failed(vm, exc), on_exit=lambda: release(vm)):
        step(job_id, "stop-source", lambda: _stop_source_best_effort(vm))
        _start_on_point(job_id, vm, point, host, "unplanned")


def _stop_source_best_effort(vm: str) -> dict[str, Any]:
    """An unplanned failover stops the source if it can still be reached."""
    ctx = context()
    item = load_item(vm)
    if item.state is ItemState.FAILED_OVER:
        return {"skipped": "re-run: the source is already the old side"}
    source = vm_at(ctx, vm, item.active_site)
    if source is None:
        return {"stopped": None, "reason": "the source VM is gone"}
    try:
        return stop_vm(ctx, source)
    except (SiteRecoveryError, OSError) as exc:
        return {"stopped": None, "reason": str(exc)}


def _start_on_point(job_id: str, vm: str, point: str, host: str, kind: str) -> None:
    ctx = context()
    item = load_item(vm)
    if item.state is ItemState.FAILED_OVER:
        # Re-run with another point: the previous failed-over VM goes first.
        step(job_id, "remove-previous-failover", lambda: _remove_previous(vm))
        item = load_item(vm)
    checkpoint = "fo" + job_id[1:9]
    target = step(
        job_id,
        "create-target-vm",
        lambda: _create_on_point(ctx, item, point, host, name=vm, checkpoint=checkpoint).to_dict(),
    )
    step(job_id, "start-target-vm", lambda: start_vm(ctx, vm_required(ctx, vm, target["site"])))
    last = ctx.store.get_tracking(vm=vm).get("last_checkpoint") or {}
    source_checkpoint = last.get("tag") if last.get("point") == point else None
    step(
        job_id,
        "switch-direction",
        lambda: switch_direction(
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
    item = load_item(vm)
    delete_vm(ctx, vm, item.active_site)
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
    with job_scope(job_id, on_error=lambda exc: failed(vm, exc), on_exit=lambda: release(vm)):
        ctx = context()
        item = load_item(vm)
        source = vm_at(ctx, vm, item.active_site)
        assert source is not None
        stopped = step(job_id, "stop-source", lambda: stop_vm(ctx, source))
        final = step(job_id, "final-replication", lambda: _final_pass(job_id, vm))
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


# Commit and reprotect -------------------------------------------------------------


@DBOS.workflow(name="commit")
def commit_workflow(job_id: str, vm: str) -> None:
    """End the failover; after a failback, delete the VM left at the other site."""
    with job_scope(job_id, on_error=lambda exc: failed(vm, exc), on_exit=lambda: release(vm)):
        step(job_id, "commit", lambda: _commit(vm))


def _commit(vm: str) -> dict[str, Any]:
    ctx = context()
    item = load_item(vm)
    deleted = None
    if item.active_site == home_of(context(), item):
        delete_vm(ctx, vm, item.standby_site)
        deleted = f"{vm}@{item.standby_site}"
    ctx.store.update_item(vm=vm, state=ItemState.COMMITTED, last_error=None)
    return {"state": ItemState.COMMITTED.value, "deleted": deleted}


@DBOS.workflow(name="reprotect")
def reprotect_workflow(job_id: str, vm: str) -> None:
    """Replicate from where the VM runs to the other site, from a common base."""

    def on_error(exc: BaseException) -> None:
        context().store.update_item(vm=vm, state=ItemState.COMMITTED, last_error=failure(exc))

    with job_scope(job_id, on_error=on_error, on_exit=lambda: release(vm)):
        step(job_id, "adopt-base", lambda: _adopt_base(vm))
        report = step(job_id, "initial-sync", lambda: initial_pass(job_id, vm))
        context().store.merge_job_result(job_id=job_id, initial_sync=report)
        step(job_id, "enable-replication", lambda: _enable(vm))


def _adopt_base(vm: str) -> dict[str, Any]:
    """A stopped VM at the target site becomes the base of the new replica chain."""
    ctx = context()
    item = load_item(vm)
    old = vm_at(ctx, vm, item.standby_site)
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
    vm = vm_at(ctx, item.vm, item.active_site)
    provider = ctx.provider(site)
    return vm is not None and any(
        ReplicaChain(provider.replica_dir(site, item.vm, d.name), d.size).head() for d in vm.disks
    )


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
    with job_scope(job_id, on_exit=lambda: release(vm)):
        ctx = context()
        ctx.store.merge_tracking(vm=vm, pinned=[point])
        item = load_item(vm)
        name = f"{vm}-test"
        started = time.monotonic()
        created = step(
            job_id, "create-test-vm", lambda: _drill_vm(ctx, item, point, host, name, switch)
        )
        step(
            job_id,
            "start-test-vm",
            lambda: start_vm(ctx, vm_required(ctx, name, item.standby_site)),
        )
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
        vm = Vm(**{**vm_fields(vm), "nics": (switch,)})
        ctx.store.add_vm(vm=vm)
    return vm.to_dict()


@DBOS.workflow(name="cleanup-test")
def cleanup_test_workflow(job_id: str, vm: str) -> None:
    with job_scope(job_id):
        step(job_id, "delete-test-vm", lambda: _cleanup(vm))


def _cleanup(vm: str) -> dict[str, Any]:
    ctx = context()
    drill = ctx.store.get_tracking(vm=vm).get("drill") or {}
    if drill:
        delete_vm(ctx, drill["vm"], drill["site"])
    ctx.store.merge_tracking(vm=vm, drill=None, pinned=[])
    return {"deleted": f"{drill.get('vm')}@{drill.get('site')}" if drill else None}


# Steps ------------------------------------------------------------------------------
