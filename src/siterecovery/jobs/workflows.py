"""The workflows of siterecovery's jobs. Each step is idempotent (see runtime.py)."""

from __future__ import annotations

from typing import Any

from dbos import DBOS

from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import failure, utcnow
from siterecovery.jobs.common import initial_pass
from siterecovery.jobs.runtime import context, job_scope, run_step


@DBOS.workflow(name="protect")
def protect_workflow(job_id: str, vm: str) -> None:
    """Initial full sync to the recovery site, then continuous replication."""

    def on_error(exc: BaseException) -> None:
        state = ItemState.DISABLED
        context().store.update_item(vm=vm, state=state, last_error=failure(exc))

    with job_scope(job_id, on_error=on_error):
        _prepare(job_id, vm)
        report = _initial_sync(job_id, vm)
        context().store.merge_job_result(job_id=job_id, initial_sync=report)
        _enable(job_id, vm)


@DBOS.step(name="protect.prepare")
def _prepare(job_id: str, vm: str) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        ctx = context()
        item = ctx.store.get_item(vm=vm)
        site = ctx.store.get_site(name=item.standby_site)
        ctx.provider(site).prepare_site(site)
        return {"source": item.active_site, "target": item.standby_site}

    return run_step(job_id, "prepare", body)


@DBOS.step(name="protect.initial-sync")
def _initial_sync(job_id: str, vm: str) -> dict[str, Any]:
    return run_step(job_id, "initial-sync", lambda: initial_pass(job_id, vm))


@DBOS.step(name="protect.enable")
def _enable(job_id: str, vm: str) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        context().store.update_item(
            vm=vm, state=ItemState.PROTECTED, last_cycle=utcnow(), last_error=None
        )
        return {"state": ItemState.PROTECTED.value}

    return run_step(job_id, "enable-replication", body)
