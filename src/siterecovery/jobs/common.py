"""Helpers shared by the failover and failback workflows: the item, its VMs and
sides, stopping and starting, swapping the direction, and recorded steps."""

from __future__ import annotations

from typing import Any

from dbos import DBOS

from siterecovery.domain.errors import JobCancelled
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import Item, Vm, failure
from siterecovery.jobs.runtime import ProgressReporter, context, run_step
from siterecovery.replication import failback as data
from siterecovery.replication.cycle import PassOptions, run_pass
from siterecovery.services.context import Context


def load_item(vm: str) -> Item:
    return context().store.get_item(vm=vm)


def release(vm: str) -> None:
    context().store.merge_tracking(vm=vm, busy=None)


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
    site = ctx.store.get_site(name=vm.site)
    return data.Side(site, vm, ctx.provider(site))


def stop_vm(ctx: Context, vm: Vm) -> dict[str, Any]:
    side = side_of(ctx, vm)
    side.provider.stop_vm(side.site, vm)
    guest_state = getattr(side.provider, "guest_state", None)
    state = guest_state(side.site, vm) if callable(guest_state) else {}
    return {"stopped": f"{vm.name}@{vm.site}", "acknowledged_seq": state.get("seq")}


def start_vm(ctx: Context, vm: Vm) -> dict[str, Any]:
    side = side_of(ctx, vm)
    side.provider.start_vm(side.site, vm)
    return {"started": f"{vm.name}@{vm.site}", "host": vm.host}


def delete_vm(ctx: Context, name: str, site_name: str) -> None:
    vm = vm_at(ctx, name, site_name)
    if vm is None:
        return
    site = ctx.store.get_site(name=site_name)
    ctx.provider(site).delete_vm(site, vm)
    ctx.store.delete_vm(name=name, site=site_name)


def switch_direction(ctx: Context, item: Item, kind: str, **failover: Any) -> dict[str, Any]:
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
    with context().item_lock(vm):
        return run_pass(context(), vm, options).to_dict()
