"""The protect workflow. Each step is idempotent (see runtime.py and common.py)."""

from __future__ import annotations

from typing import Any

from dbos import DBOS

from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import failure
from siterecovery.jobs.common import enable, recorded_initial_pass, release, step
from siterecovery.jobs.runtime import context, job_scope


@DBOS.workflow(name="protect")
def protect_workflow(job_id: str, vm: str) -> None:
    """Initial full sync to the recovery site, then continuous replication.

    The job owns the item from its creation (``services/protection.protect``),
    so nothing can disable it meanwhile; ``enable-replication`` still refuses
    an item that is no longer ``enabling``.
    """

    def on_error(exc: BaseException) -> None:
        item = context().store.get_item(vm=vm)
        if item.state is ItemState.ENABLING:
            context().store.update_item(vm=vm, state=ItemState.DISABLED, last_error=failure(exc))

    with job_scope(job_id, on_error=on_error, on_exit=lambda: release(vm, job_id)):
        step(job_id, "prepare", lambda: _prepare(vm))
        step(job_id, "initial-sync", lambda: recorded_initial_pass(job_id, vm))
        step(job_id, "enable-replication", lambda: enable(vm, ItemState.ENABLING))


def _prepare(vm: str) -> dict[str, Any]:
    ctx = context()
    item = ctx.store.get_item(vm=vm)
    site = ctx.store.get_site(name=item.standby_site)
    ctx.site(site).prepare()
    return {"source": item.active_site, "target": item.standby_site}
