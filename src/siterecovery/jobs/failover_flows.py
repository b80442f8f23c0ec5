"""Workflows of failover, failback, commit, reprotect and drills.

Every step observes whether its effect already exists before acting (a VM
already created, already stopped, a view already frozen with the job's tag…),
so DBOS can re-run an interrupted step after a crash.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from dbos import DBOS

from siterecovery.context import Context
from siterecovery.domain.errors import IntegrityError, SiteRecoveryError, VmNotFound
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import Item, RecoveryPoint, Vm, failure, utcnow
from siterecovery.domain.tracking import DrillState, FailoverKind, FailoverState
from siterecovery.jobs.common import (
    delete_vm,
    enable,
    failed,
    load_item,
    recorded_initial_pass,
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
from siterecovery.replication.cycle import PassOptions, run_pass
from siterecovery.services import agents
from siterecovery.services.failover import home_of
from siterecovery.services.protection import find_point
from siterecovery.sites.base import Image, PointRef


def _create_on_point(
    ctx: Context,
    vm: str,
    at: str,
    point_id: str,
    host: str,
    *,
    name: str,
    checkpoint: str,
    switch: str | None = None,
) -> Vm:
    """A VM at site ``at`` whose disks are overlays on the point's chain files;
    with ``switch``, its one NIC is there and nowhere else (a drill's isolated
    network: the copy is made on it, never on the production one)."""
    existing = vm_at(ctx, name, at)
    if existing is not None:
        return existing
    source = next((v for v in ctx.store.find_vms(name=vm) if v.site != at), None)
    if source is None:
        raise VmNotFound(name=vm, site=None)
    fields = {**vm_fields(source), "name": name, "site": at, "host": host}
    if switch is not None:
        fields.update(nics=(switch,), nic_models=source.nic_models[:1])
    created = Vm(**fields)
    point = find_point(ctx, vm=vm, point_id=point_id)
    ctx.site(at).create_vm(created, point=PointRef(vm, point.files), checkpoint=checkpoint)
    ctx.store.add_vm(vm=created)
    return created


# Unplanned and planned failover ---------------------------------------------


@DBOS.workflow(name="unplanned-failover")
def unplanned_failover_workflow(
    job_id: str, vm: str, point: str, host: str, frm: str, to: str
) -> None:
    """Start the VM at ``to`` on a recovery point (no copy first)."""
    with job_scope(
        job_id, on_error=lambda exc: failed(vm, exc), on_exit=lambda: release(vm, job_id)
    ):
        stopped = step(job_id, "stop-source", lambda: _stop_source_best_effort(vm, frm, to))
        previous = bool(stopped.get("replace_previous"))
        _start_on_point(job_id, vm, point, host, "unplanned", frm, to, replace_previous=previous)


def _stop_source_best_effort(vm: str, frm: str, to: str) -> dict[str, Any]:
    """An unplanned failover stops the source if it can still be reached. When
    the VM already runs at ``to`` (a failover to another point), the previous
    failed-over VM is replaced and the old side stays as it is."""
    ctx = context()
    item = load_item(vm)
    if item.state is ItemState.FAILED_OVER and item.active_site == to:
        return {"skipped": "the VM runs at the recovery site", "replace_previous": True}
    source = vm_at(ctx, vm, frm)
    if source is None:
        return {"stopped": None, "reason": "the source VM is gone"}
    down = agents.site_health(ctx, frm)
    if down is not None and not down.reachable:
        # The daemon's monitor already knows: no waiting on a dead site.
        reason = f"site '{frm}' unreachable since {down.since} ({down.error}): {down.message}"
        return {"stopped": None, "reason": reason}
    try:
        return stop_vm(ctx, source)
    except (SiteRecoveryError, OSError) as exc:
        return {"stopped": None, "reason": str(exc)}


def _start_on_point(
    job_id: str,
    vm: str,
    point: str,
    host: str,
    kind: FailoverKind,
    frm: str,
    to: str,
    *,
    replace_previous: bool,
) -> None:
    ctx = context()
    if replace_previous:
        step(job_id, "remove-previous-failover", lambda: _remove_previous(vm, frm, to))
    checkpoint = "fo" + job_id[1:9]
    step(
        job_id,
        "create-target-vm",
        lambda: _create_on_point(
            ctx, vm, to, point, host, name=vm, checkpoint=checkpoint
        ).to_dict(),
    )
    step(job_id, "start-target-vm", lambda: start_vm(ctx, vm_required(ctx, vm, to)))
    step(
        job_id,
        "switch-direction",
        lambda: _switch_to_point(vm, kind, point, host, frm, to, checkpoint),
    )


def _switch_to_point(
    vm: str, kind: FailoverKind, point: str, host: str, frm: str, to: str, checkpoint: str
) -> dict[str, Any]:
    """The direction swaps; the old side keeps the bitmap of the point when the
    point was the latest (a later delta failback sends only what changed)."""
    ctx = context()
    tracking = ctx.store.item_tracking(vm=vm)
    previous, last = tracking.failover, tracking.last_checkpoint
    if previous is not None and previous.source_checkpoint == checkpoint:
        kept = previous.target_checkpoint  # a re-run: already switched
    else:
        kept = last.tag if last is not None and last.point == point else None
    failover = FailoverState(
        kind=kind,
        to=to,
        came_from=frm,
        point=point,
        host=host,
        source_checkpoint=checkpoint,
        target_checkpoint=kept,
    )
    return switch_direction(ctx, vm, failover)


def _remove_previous(vm: str, frm: str, to: str) -> dict[str, Any]:
    """Delete the VM a previous failover started at ``to``; the item is back to
    ``frm`` → ``to`` until the new one starts."""
    ctx = context()
    delete_vm(ctx, vm, to)
    ctx.store.update_item(vm=vm, active_site=frm, standby_site=to, state=ItemState.PROTECTED)
    return {"deleted": f"{vm}@{to}"}


@DBOS.workflow(name="planned-failover")
def planned_failover_workflow(job_id: str, vm: str, host: str, frm: str, to: str) -> None:
    """Stop the source cleanly, replicate its last changes, start the VM at ``to``."""
    with job_scope(
        job_id, on_error=lambda exc: failed(vm, exc), on_exit=lambda: release(vm, job_id)
    ):
        ctx = context()
        stopped = step(job_id, "stop-source", lambda: stop_vm(ctx, vm_required(ctx, vm, frm)))
        final = step(job_id, "final-replication", lambda: _final_pass(job_id, vm, stopped))
        _start_on_point(
            job_id, vm, final["point"]["id"], host, "planned", frm, to, replace_previous=False
        )


def _final_pass(job_id: str, vm: str, stopped: dict[str, Any]) -> dict[str, Any]:
    """The last pass of the stopped source (its tag is the job's: a re-run resumes)."""
    ctx = context()
    tag = "f" + job_id[1:11]
    last = ctx.store.item_tracking(vm=vm).last_checkpoint
    if last is not None and last.tag == tag:
        # A re-run after the pass sealed its point (the crash came before DBOS
        # recorded the step): that point is the final one, nothing more to send.
        point = find_point(ctx, vm=vm, point_id=last.point)
        source = vm_required(ctx, vm, load_item(vm).active_site)  # stopped, not yet switched
        disks = _prove_point(ctx, source, point)
        report: dict[str, Any] = {"point": point.to_dict(), "disks": disks, "sealed_before": True}
    else:
        options = PassOptions(tag=tag, progress=ProgressReporter(job_id))
        report = run_pass(ctx, vm, options).to_dict()
    ctx.store.merge_job_result(
        job_id=job_id,
        zero_data_loss={
            "acknowledged_seq_at_stop": stopped.get("acknowledged_seq"),
            "point": report["point"]["id"],
        },
    )
    return report


def _prove_point(ctx: Context, source: Vm, point: RecoveryPoint) -> dict[str, Any]:
    """Whole-disk digests of the stopped source and of the sealed point, each
    computed at its own site: the integrity proof of a final pass whose report
    was lost in a crash."""
    mine = ctx.site(source.site).digests(Image(vm=source))
    theirs = ctx.site(point.site).digests(Image(point=PointRef(point.vm, point.files)))
    proof = {}
    for disk in sorted(mine):
        src, dst = mine[disk]["digest"], theirs[disk]["digest"]
        if src != dst:
            raise IntegrityError(what=f"disk {disk}", source=src, target=dst)
        proof[disk] = {"source_digest": src, "target_digest": dst}
    return proof


# Commit and reprotect -------------------------------------------------------------


@DBOS.workflow(name="commit")
def commit_workflow(job_id: str, vm: str) -> None:
    """End the failover; after a failback, delete the VM left at the other site."""
    with job_scope(
        job_id, on_error=lambda exc: failed(vm, exc), on_exit=lambda: release(vm, job_id)
    ):
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

    with job_scope(job_id, on_error=on_error, on_exit=lambda: release(vm, job_id)):
        step(job_id, "adopt-base", lambda: _adopt_base(vm))
        step(job_id, "initial-sync", lambda: recorded_initial_pass(job_id, vm))
        step(job_id, "enable-replication", lambda: enable(vm, ItemState.REPROTECTING))


def _adopt_base(vm: str) -> dict[str, Any]:
    """A stopped VM at the target site becomes the base of the new replica chain."""
    ctx = context()
    item = load_item(vm)
    old = vm_at(ctx, vm, item.standby_site)
    if old is None:
        return {"base": "the existing replica chain" if _has_chain(ctx, item) else None}
    seq = ctx.store.next_point_seq(vm=vm)
    # Idempotent for one seq: a crash before the vault forgets the VM adopts again.
    ctx.site(item.standby_site).adopt_vm(old, vm, seq)
    ctx.store.delete_vm(
        name=vm, site=item.standby_site, tracking=lambda t: replace(t, next_seq=seq + 1)
    )
    return {"base": f"VM {vm} at {item.standby_site}", "file": f"p{seq:06d}.qcow2"}


def _has_chain(ctx: Context, item: Item) -> bool:
    site = ctx.site(item.standby_site)
    vm = vm_at(ctx, item.vm, item.active_site)
    return vm is not None and any(site.chain(item.vm, d.name) for d in vm.disks)


# Drills ---------------------------------------------------------------------------


@DBOS.workflow(name="test-failover")
def test_failover_workflow(job_id: str, vm: str, point: str, host: str, switch: str) -> None:
    """Start a copy of the VM at the recovery site on an isolated switch; replication goes on."""
    with job_scope(job_id, on_exit=lambda: release(vm, job_id)):
        created = step(job_id, "create-test-vm", lambda: _drill_vm(job_id, vm, point, host, switch))
        step(job_id, "start-test-vm", lambda: _start_drill(job_id, vm, point, created))


def _drill_vm(job_id: str, vm: str, point: str, host: str, switch: str) -> dict[str, Any]:
    """The drill VM on the point, on the isolated switch. The point is pinned and
    the drill recorded first, so a crash leaves nothing cleanup-test can't find."""
    began = time.time()  # the drill's RTO runs from here to the VM started
    ctx = context()
    item = load_item(vm)
    name = f"{vm}-test"
    drill = DrillState(vm=name, site=item.standby_site, point=point, job=job_id)
    ctx.store.update_item_tracking(vm=vm, change=lambda t: replace(t, pinned=(point,), drill=drill))
    made = _create_on_point(
        ctx, vm, item.standby_site, point, host, name=name, checkpoint="drill", switch=switch
    )
    return {**made.to_dict(), "at": began}


def _start_drill(job_id: str, vm: str, point: str, created: dict[str, Any]) -> dict[str, Any]:
    ctx = context()
    started = start_vm(ctx, vm_required(ctx, created["name"], created["site"]))
    chosen = find_point(ctx, vm=vm, point_id=point)
    ctx.store.merge_job_result(
        job_id=job_id,
        drill={
            "vm": created["name"],
            "switch": created["nics"][0],
            "rto_seconds": round(started["at"] - created["at"], 3),
            "rpo_seconds": round((utcnow() - chosen.time).total_seconds(), 3),
        },
    )
    return started


@DBOS.workflow(name="cleanup-test")
def cleanup_test_workflow(job_id: str, vm: str) -> None:
    with job_scope(job_id, on_exit=lambda: release(vm, job_id)):
        step(job_id, "delete-test-vm", lambda: _cleanup(vm))


def _cleanup(vm: str) -> dict[str, Any]:
    ctx = context()
    drill = ctx.store.item_tracking(vm=vm).drill
    if drill is not None:
        delete_vm(ctx, drill.vm, drill.site)
    ctx.store.update_item_tracking(vm=vm, change=lambda t: replace(t, drill=None, pinned=()))
    return {"deleted": f"{drill.vm}@{drill.site}" if drill else None}


# Steps ------------------------------------------------------------------------------
