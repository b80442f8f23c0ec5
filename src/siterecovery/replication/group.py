"""A replication group's common point: every member frozen at one instant.

Order (the seed's multi-VM consistency):

1. own every member's item in the vault, all or none (one transaction), and
   open every member's disk access;
2. quiesce every member's guest, one after the other;
3. freeze every member's disks (its new checkpoint and point-in-time views);
4. thaw every guest — the pause ends here, before any byte is copied;
5. send each member's changes and seal its point, all tagged with one common id.

Each member's point is an ordinary point of its chain (a later independent
pass starts from it), so a crash between two members' seals leaves a common id
held by some members only: plans never select such an id (see
:func:`newest_common`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import GroupIncomplete
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import PointType, RecoveryPoint, utcnow
from siterecovery.domain.recovery import ReplicationGroup
from siterecovery.replication.cycle import PassOptions, PassRun, new_tag
from siterecovery.services import ownership
from siterecovery.sites.base import GROUP_NOT_QUIESCED, NOT_ASKED, FrozenDisks


def run_common_pass(ctx: Context, group: ReplicationGroup) -> dict[str, Any]:
    """Take one common point of ``group`` now; its report (points, pause)."""
    members = sorted(group.members)
    tag = new_tag()
    with _owned(ctx, group, members, ownership.pass_owner(tag)):
        _require_ready(ctx, group)
        common = group.common_id(ctx.store.take_common_seq(name=group.name))
        runs = [PassRun.open(ctx, vm, _options(ctx, vm, tag)) for vm in members]
        source = runs[0].source  # members replicate between the same two sites
        vms = [run.vm for run in runs]
        try:
            frozen = source.freeze(vms, tag, initial=False, quiesce=True)
            moment = utcnow()
            seqs = [frozen.seqs.get(vm) for vm in members]
            app = all(frozen.app_consistent(vm) for vm in members)
            reports = [
                run.finish(frozen, moment, common=common, app_consistent=app,
                           quiesce=None if app else _not_quiesced(frozen, members))
                for run in runs
            ]  # fmt: skip
        except BaseException:
            for vm in vms:
                source.release(vm, tag, drop_older=False)
            raise
        paused = frozen.paused_seconds
        for run in runs:
            run.retain()
    ctx.store.update_group(name=group.name, last_common=moment)
    return {
        "common": common,
        "type": (PointType.APP_CONSISTENT if app else PointType.CRASH_CONSISTENT).value,
        "time": reports[0].point.to_dict()["time"],
        "paused_seconds": round(paused, 4),
        "points": {r.point.vm: r.point.id for r in reports},
        "workload_seqs": {vm: seq for vm, seq in zip(members, seqs, strict=True)},
        "quiesce": {vm: frozen.quiesce.get(vm) for vm in members},
    }


def _not_quiesced(frozen: FrozenDisks, members: list[str]) -> str:
    """Why a group's common point is crash-consistent: its first member that did
    not quiesce, and why (its own point says so even when it did quiesce)."""
    vm = next(vm for vm in members if not frozen.app_consistent(vm))
    return f"{GROUP_NOT_QUIESCED}: {vm}: {frozen.quiesce.get(vm, NOT_ASKED)}"


@contextmanager
def _owned(ctx: Context, group: ReplicationGroup, members: list[str], owner: str) -> Iterator[None]:
    """Every member owned by the common pass (all or none), released at the end."""
    holders = ctx.store.take_items(owners={vm: owner for vm in members})
    if holders:
        vm, holder = sorted(holders.items())[0]
        raise GroupIncomplete(group=group.name, vm=vm, state=ownership.holder_text(holder))
    try:
        yield
    finally:
        for vm in members:
            ownership.release(ctx, vm, owner)


def _options(ctx: Context, vm: str, tag: str) -> PassOptions:
    """A member's pass: app-consistent, and it stops when an operation claims the VM."""
    return PassOptions(tag=tag, app_consistent=True, cancelled=ownership.preemption(ctx, vm))


def _require_ready(ctx: Context, group: ReplicationGroup) -> None:
    for vm in group.members:
        item = ctx.store.find_item(vm=vm)
        state = "not protected" if item is None else item.state.value
        if item is None or item.state is not ItemState.PROTECTED:
            raise GroupIncomplete(group=group.name, vm=vm, state=state)


def newest_common(
    ctx: Context, group: ReplicationGroup, site: str, *, kind: PointType | None = None
) -> dict[str, RecoveryPoint] | None:
    """The newest common point every member holds at ``site`` (of type ``kind``):
    member -> its point, or None when there is none."""
    by_member = {
        vm: {p.common: p for p in ctx.store.list_points(vm=vm, site=site) if p.common}
        for vm in group.members
    }
    if not by_member:
        return None
    shared = set.intersection(*(set(points) for points in by_member.values()))
    candidates = sorted(
        (c for c in shared if c is not None),
        key=lambda c: by_member[group.members[0]][c].time,
        reverse=True,
    )
    for common in candidates:
        chosen = {vm: points[common] for vm, points in by_member.items()}
        if kind is None or all(p.type is kind for p in chosen.values()):
            return chosen
    return None
