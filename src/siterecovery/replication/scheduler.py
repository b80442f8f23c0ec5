"""The replication scheduler: runs a pass for every protected item when it is due.

A background thread wakes every ``tick`` seconds, picks the items in state
``protected`` whose last pass is older than their policy interval and runs
their passes on a small thread pool. A pass owns its item in the vault while it
runs (``services/ownership.py``): an item a job owns is skipped, and a user's
operation that claims the item stops the pass at its next chunk. Replication
groups whose last common point is older than their ``common_interval`` get a
common pass (owning every member). A pass
that fails records ``last_error`` on the item and is retried at the next
interval; the item's health shows it. Restarting the daemon restarts the
scheduler, which picks up where the vault says.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime

from siterecovery.context import Context
from siterecovery.domain.errors import PassPreempted, VmBusy
from siterecovery.domain.lifecycle import ItemState, Operation, require
from siterecovery.domain.model import Item, failure, utcnow
from siterecovery.domain.recovery import ReplicationGroup
from siterecovery.replication.cycle import (
    PassOptions,
    PassReport,
    new_tag,
    run_pass,
)
from siterecovery.replication.group import run_common_pass
from siterecovery.services import ownership

log = logging.getLogger(__name__)


def is_due(item: Item, now: datetime) -> bool:
    if item.state is not ItemState.PROTECTED:
        return False
    if item.last_cycle is None:
        return True
    return (now - item.last_cycle).total_seconds() >= item.policy.interval


def wants_app_consistent(item: Item) -> bool:
    every = item.policy.app_consistent_every
    return every > 0 and (item.cycles + 1) % every == 0


def replicate_now(ctx: Context, vm: str, *, app_consistent: bool | None = None) -> PassReport:
    """Run one pass of ``vm`` now and record the outcome on the item.

    The pass owns the item while it runs (VmBusy at once if anything else does)
    and gives way to a user's operation that claims the item: it stops at its
    next chunk with PassPreempted, which is not a failure of the item.
    """
    item = ctx.store.get_item(vm=vm)
    require(item.state, Operation.REPLICATE, vm=vm)
    tag = new_tag()
    owner = ownership.pass_owner(tag)
    ownership.take(ctx, vm, owner, preempt=False)
    try:
        item = ctx.store.get_item(vm=vm)
        require(item.state, Operation.REPLICATE, vm=vm)
        consistent = wants_app_consistent(item) if app_consistent is None else app_consistent
        options = PassOptions(
            tag=tag, app_consistent=consistent, cancelled=ownership.preemption(ctx, vm)
        )
        try:
            report = run_pass(ctx, vm, options)
        except PassPreempted:
            raise
        except Exception as exc:
            ctx.store.update_item(vm=vm, last_error=failure(exc), last_cycle=utcnow())
            raise
        ctx.store.update_item(vm=vm, cycles=item.cycles + 1, last_cycle=utcnow(), last_error=None)
        return report
    finally:
        ownership.release(ctx, vm, owner)


class Scheduler:
    """Background replication of every protected item."""

    def __init__(self, ctx: Context, *, workers: int = 4, tick: float = 1.0) -> None:
        self.ctx = ctx
        self.tick = tick
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="replicate")
        self._running: dict[str, Future[None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self._dispatch()
            except Exception:  # the loop must survive a bad tick
                log.exception("replication scheduler tick failed")

    def _dispatch(self) -> None:
        now = utcnow()
        for group in self.ctx.store.list_groups():
            key = f"group:{group.name}"
            busy = self._running.get(key)
            if (busy is None or busy.done()) and self._group_due(group, now):
                self._running[key] = self._pool.submit(self._run_group, group.name)
        for item in self.ctx.store.list_items():
            busy = self._running.get(item.vm)
            if busy is not None and not busy.done():
                continue
            if is_due(item, now):
                self._running[item.vm] = self._pool.submit(self._run, item.vm)

    def _group_due(self, group: ReplicationGroup, now: datetime) -> bool:
        if group.common_interval <= 0 or not group.members:
            return False
        last = group.last_common or group.created
        if (now - last).total_seconds() < group.common_interval:
            return False
        items = [self.ctx.store.find_item(vm=vm) for vm in group.members]
        return all(i is not None and i.state is ItemState.PROTECTED for i in items)

    def _run_group(self, name: str) -> None:
        if self._stop.is_set():
            return
        try:
            run_common_pass(self.ctx, self.ctx.store.get_group(name=name))
        except Exception as exc:
            log.warning("common point of group %s failed: %s", name, exc)

    def _run(self, vm: str) -> None:
        if self._stop.is_set():
            return
        item = self.ctx.store.find_item(vm=vm)
        if item is None or item.state is not ItemState.PROTECTED:
            return
        try:
            replicate_now(self.ctx, vm)
        except (VmBusy, PassPreempted) as exc:
            log.info("replication of %s skipped: %s", vm, exc)
        except Exception as exc:
            log.warning("replication of %s failed: %s", vm, exc)
