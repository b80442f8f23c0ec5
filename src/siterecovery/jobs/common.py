"""Helpers shared by the failover and failback workflows: the item, its VMs and
sides, stopping and starting, swapping the direction, and recorded steps.

Replay rule: a workflow body decides only from its parameters (the direction
``frm`` → ``to`` is fixed when the job is submitted) and from the recorded
results of its steps; every read of live state and every write happens inside
a step. DBOS re-runs a body after a crash: it must take the same path.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from dbos import DBOS

from siterecovery.context import Context
from siterecovery.domain.errors import ItemChanged, JobCancelled
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import Item, Vm, failure, utcnow
from siterecovery.domain.tracking import FailoverState
from siterecovery.jobs.runtime import ProgressReporter, context, run_step
from siterecovery.replication import failback as data
from siterecovery.replication.cycle import PassOptions, run_pass
from siterecovery.services import ownership


def load_item(vm: str) -> Item:
    return context().store.get_item(vm=vm)


def release(vm: str, job_id: str) -> None:
    """The job's end: the item is free again (only if this job still owns it)."""
    ownership.release(context(), vm, job_id)


def failed(vm: str, exc: BaseException) -> None:
    context().store.update_item(vm=vm, last_error=failure(exc))


def cancel_check(reporter: ProgressReporter, job_id: str) -> Any:
    def cancelled() -> bool:
        if reporter.cancelled():
            raise JobCancelled(job=job_id)
        return False

    return cancelled


def vm_at(ctx: Context, name: str, site: str) -> Vm | None:
    found = ctx.store.find_vms(name=name, site=site)
    return found[0] if found else None


def vm_required(ctx: Context, name: str, site: str) -> Vm:
    """The VM ``name`` at ``site`` (VmNotFound when it is gone)."""
    return ctx.store.get_vm(name=name, site=site)


def vm_fields(vm: Vm) -> dict[str, Any]:
    return {f: getattr(vm, f) for f in Vm.__dataclass_fields__}


def side_of(ctx: Context, vm: Vm) -> data.Side:
    return data.Side(vm, ctx.site(vm.site))


def stop_vm(ctx: Context, vm: Vm) -> dict[str, Any]:
    """Stop ``vm``; ``at`` is when it was stopped (the start of a downtime)."""
    site = ctx.site(vm.site)
    began = time.time()
    site.stop_vm(vm)
    stopped = time.time()
    state = site.guest_state(vm)
    return {
        "stopped": f"{vm.name}@{vm.site}",
        "acknowledged_seq": state.get("seq"),
        "at": stopped,
        "stop_seconds": round(stopped - began, 3),
    }


def start_vm(ctx: Context, vm: Vm) -> dict[str, Any]:
    """Start ``vm``; ``at`` is when it was started (the end of a downtime)."""
    began = time.time()
    ctx.site(vm.site).start_vm(vm)
    started = time.time()
    return {
        "started": f"{vm.name}@{vm.site}",
        "host": vm.host,
        "at": started,
        "start_seconds": round(started - began, 3),
    }


def delete_vm(ctx: Context, name: str, site_name: str) -> None:
    vm = vm_at(ctx, name, site_name)
    if vm is None:
        return
    ctx.site(site_name).delete_vm(vm)
    ctx.store.delete_vm(name=name, site=site_name)


def switch_direction(ctx: Context, vm: str, failover: FailoverState) -> dict[str, Any]:
    """The VM now runs at ``failover.to``: the item's direction becomes
    ``to`` → ``came_from``, and the failover is remembered.

    Idempotent: a re-run after the swap changes nothing more.
    """
    to, frm = failover.to, failover.came_from
    item = ctx.store.get_item(vm=vm)
    if item.state is not ItemState.FAILED_OVER or item.active_site != to:
        ctx.store.update_item(
            vm=vm, active_site=to, standby_site=frm, state=ItemState.FAILED_OVER, last_error=None
        )
    ctx.store.update_item_tracking(
        vm=vm,
        change=lambda t: replace(
            t, failover=failover, hosts={**t.hosts, to: failover.host}, resume=None
        ),
    )
    return {"state": ItemState.FAILED_OVER.value, "active_site": to}


def step(job_id: str, name: str, body: Any) -> Any:
    """Run ``body`` as the durable step ``name`` of the job (recorded in DBOS and
    in the job's steps)."""
    return DBOS.run_step({"name": name}, lambda: run_step(job_id, name, body))


def initial_pass(job_id: str, vm: str) -> dict[str, Any]:
    """The first pass of a (re)protection: tagged by the job so a restarted job
    finds its view again and resumes; progress and cancel go through the job."""
    reporter = ProgressReporter(job_id)
    options = PassOptions(
        tag=job_id, initial=True, progress=reporter, cancelled=cancel_check(reporter, job_id)
    )
    return run_pass(context(), vm, options).to_dict()  # under the job's ownership


def recorded_initial_pass(job_id: str, vm: str) -> dict[str, Any]:
    """The initial pass, its report also kept in the job's result."""
    report = initial_pass(job_id, vm)
    context().store.merge_job_result(job_id=job_id, initial_sync=report)
    return report


def enable(vm: str, expected: ItemState) -> dict[str, Any]:
    """Replication starts: ``expected`` → protected. Idempotent; refuses (nothing
    changes) if the item left ``expected`` meanwhile, e.g. it was disabled."""
    item = load_item(vm)
    if item.state is not ItemState.PROTECTED:
        if item.state is not expected:
            raise ItemChanged(vm=vm, state=item.state.value, expected=expected.value)
        context().store.update_item(
            vm=vm, state=ItemState.PROTECTED, last_cycle=utcnow(), last_error=None
        )
    context().store.update_item_tracking(vm=vm, change=lambda t: replace(t, failover=None))
    return {"state": ItemState.PROTECTED.value}
