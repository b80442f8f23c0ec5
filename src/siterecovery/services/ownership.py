"""Taking an item before changing it: who holds it, and giving way.

Every operation that changes an item's disks, replicas or state owns the item
first (:class:`~siterecovery.store.owner_repo.OwnerRepo`: one conditional
UPDATE). A job's ownership lasts until the job ends; a replication pass's until
the pass ends. Nothing here blocks on a lock: a user's operation that finds a
pass in its way asks the pass to stop at its next chunk and waits at most
:data:`PREEMPT_WAIT` seconds for the hand-over; one that finds a job is refused
at once with ``VM_BUSY`` naming the job.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from siterecovery.context import Context
from siterecovery.domain.errors import PassPreempted, VmBusy
from siterecovery.store.owner_repo import PASS_PREFIX, is_job

PREEMPT_WAIT = 30.0
"""Seconds a user's operation waits for a replication pass to stop (a pass
checks between chunks, a few times per second, rate limit included)."""


def pass_owner(tag: str) -> str:
    return PASS_PREFIX + tag


def operation_owner(name: str) -> str:
    """An owner for a synchronous operation (not a job), e.g. ``disable:3f2a…``."""
    return f"{name}:{uuid.uuid4().hex[:10]}"


def holder_name(holder: str) -> str:
    """``holder`` for a message: "job j…", "the replication pass c…", "the operation …"."""
    if holder.startswith(PASS_PREFIX):
        return f"the replication pass {holder[len(PASS_PREFIX) :]}"
    if is_job(holder):
        return f"job {holder}"
    return f"the operation {holder}"


def holder_text(holder: str) -> str:
    return f"owned by {holder_name(holder)}" if is_job(holder) else f"held by {holder_name(holder)}"


def busy(vm: str, holder: str) -> VmBusy:
    hint = (
        f"wait for it or cancel it (siterecovery job cancel {holder})"
        if is_job(holder)
        else "retry in a moment"
    )
    return VmBusy(vm=vm, state=holder_text(holder), hint=hint)


def take(ctx: Context, vm: str, owner: str, *, preempt: bool = True) -> None:
    """Make ``owner`` the owner of ``vm``'s item, or raise VmBusy naming the holder.

    With ``preempt``, a replication pass holding the item is asked to stop and
    hands the item over; if it has not within :data:`PREEMPT_WAIT` seconds the
    claim is withdrawn and VmBusy says so. Nothing changes on refusal.
    """
    holder = ctx.store.take_item(vm=vm, owner=owner)
    if holder is None:
        return
    if preempt and holder.startswith(PASS_PREFIX) and ctx.store.claim_item(vm=vm, claimant=owner):
        if _handed_over(ctx, vm, owner):
            return
        raise VmBusy(
            vm=vm,
            state=f"{holder_text(holder)}, which did not stop within {PREEMPT_WAIT:.0f} s",
            hint="retry in a moment",
        )
    current, _claim = ctx.store.item_owner(vm=vm)
    raise busy(vm, current or holder)


def _handed_over(ctx: Context, vm: str, owner: str) -> bool:
    deadline = time.monotonic() + PREEMPT_WAIT
    while time.monotonic() < deadline:
        if ctx.store.item_owner(vm=vm)[0] == owner:
            return True
        time.sleep(0.05)
    ctx.store.withdraw_claim(vm=vm, claimant=owner)
    # The hand-over and the withdrawal are both atomic: exactly one happened.
    return ctx.store.item_owner(vm=vm)[0] == owner


def take_all(ctx: Context, owners: dict[str, str]) -> None:
    """Take every item of ``owners`` (vm → owner) or none; VmBusy names a holder."""
    holders = ctx.store.take_items(owners=owners)
    if holders:
        vm, holder = sorted(holders.items())[0]
        raise busy(vm, holder)


def release(ctx: Context, vm: str, owner: str) -> None:
    """Release ``vm`` if ``owner`` holds it (idempotent)."""
    ctx.store.release_item(vm=vm, owner=owner)


def preemption(ctx: Context, vm: str, *, every: float = 0.2) -> Callable[[], bool]:
    """A pass's cancel check: raises PassPreempted once an operation claimed ``vm``.

    Polls the vault at most every ``every`` seconds (it is called between chunks).
    """
    last = [0.0]

    def cancelled() -> bool:
        now = time.monotonic()
        if now - last[0] < every:
            return False
        last[0] = now
        claim = ctx.store.item_owner(vm=vm)[1]
        if claim is not None:
            raise PassPreempted(vm=vm, by=holder_name(claim))
        return False

    return cancelled
