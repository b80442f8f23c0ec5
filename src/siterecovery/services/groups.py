"""Replication groups: create, change, list; take a common point now.

A group's members are replicated items that replicate between the same two
sites; a VM belongs to one group at most. Every change is validated completely
before anything is written.
"""

from __future__ import annotations

from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import (
    AlreadyInGroup,
    GroupSitesDiffer,
    InvalidInput,
    ProtectionDisabled,
)
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import utcnow
from siterecovery.domain.recovery import MAX_GROUP_SIZE, ReplicationGroup
from siterecovery.domain.values import check_name


def create_group(
    ctx: Context, *, name: str, vms: list[str], common_interval: float = 300.0
) -> dict[str, Any]:
    check_name("name", name)
    _check_interval(common_interval)
    empty = ReplicationGroup(name, (), utcnow(), common_interval=common_interval)
    group = _validated(ctx, empty, _unique(vms))
    return group_view(ctx, ctx.store.add_group(group=group))


def add_members(ctx: Context, *, name: str, vms: list[str]) -> dict[str, Any]:
    group = ctx.store.get_group(name=name)
    members = list(group.members) + [vm for vm in _unique(vms) if vm not in group.members]
    group = _validated(ctx, group, members)
    return group_view(ctx, ctx.store.update_group(name=name, members=list(group.members)))


def remove_members(ctx: Context, *, name: str, vms: list[str]) -> dict[str, Any]:
    group = ctx.store.get_group(name=name)
    missing = [vm for vm in vms if vm not in group.members]
    if missing:
        raise InvalidInput(
            field="vms", reason=f"{', '.join(missing)} not in group '{name}' ({_list(group)})"
        )
    members = [vm for vm in group.members if vm not in vms]
    return group_view(ctx, ctx.store.update_group(name=name, members=members))


def delete_group(ctx: Context, *, name: str) -> dict[str, Any]:
    group = ctx.store.get_group(name=name)
    ctx.store.delete_group(name=name)
    return {"deleted": group.name, "members": list(group.members)}


def list_groups(ctx: Context) -> list[dict[str, Any]]:
    return [group_view(ctx, g) for g in ctx.store.list_groups()]


def show_group(ctx: Context, *, name: str) -> dict[str, Any]:
    return group_view(ctx, ctx.store.get_group(name=name))


def take_common_point(ctx: Context, *, name: str) -> dict[str, Any]:
    """A common point of every member, now (the scheduler takes them every
    ``common_interval`` seconds)."""
    from siterecovery.replication.group import run_common_pass

    return run_common_pass(ctx, ctx.store.get_group(name=name))


def group_view(ctx: Context, group: ReplicationGroup) -> dict[str, Any]:
    from siterecovery.domain.model import PointType
    from siterecovery.replication.group import newest_common

    items = [i for i in (ctx.store.find_item(vm=vm) for vm in group.members) if i is not None]
    first = items[0] if items else None
    site = first.standby_site if first else None
    latest = newest_common(ctx, group, site) if site else None
    app = newest_common(ctx, group, site, kind=PointType.APP_CONSISTENT) if site else None
    return {
        **group.to_dict(),
        "limit": MAX_GROUP_SIZE,
        "direction": f"{first.active_site} -> {first.standby_site}" if first else None,
        "latest_common": _common_view(latest),
        "latest_common_app_consistent": _common_view(app),
    }


def _common_view(points: dict[str, Any] | None) -> dict[str, Any] | None:
    if not points:
        return None
    first = next(iter(points.values()))
    return {
        "common": first.common,
        "time": first.to_dict()["time"],
        "type": first.type.value,
        "points": {vm: p.id for vm, p in points.items()},
    }


def _validated(ctx: Context, group: ReplicationGroup, members: list[str]) -> ReplicationGroup:
    """``group`` with ``members``, or the first rule they break."""
    if not members:
        raise InvalidInput(field="vms", reason="a replication group needs at least one VM")
    grown = group.with_members(members)  # GroupTooLarge
    expected: str | None = None
    for vm in members:
        item = ctx.store.get_item(vm=vm)  # ItemNotFound: only protected VMs
        if item.state is ItemState.DISABLED:
            raise ProtectionDisabled(vm=vm)
        other = ctx.store.group_of(vm=vm)
        if other is not None and other.name != group.name:
            raise AlreadyInGroup(vm=vm, group=other.name)
        direction = f"{item.active_site} -> {item.standby_site}"
        expected = expected or direction
        if direction != expected:
            raise GroupSitesDiffer(vm=vm, direction=direction, group=group.name, expected=expected)
    return grown


def _check_interval(seconds: float) -> None:
    if seconds != 0 and not 10 <= seconds <= 7 * 24 * 3600:
        raise InvalidInput(
            field="common_interval",
            reason=f"{seconds} s: use 0 (on demand only) or 10 s to 7 days",
        )


def _unique(vms: list[str]) -> list[str]:
    for vm in vms:
        check_name("vm", vm)
    return list(dict.fromkeys(vms))


def _list(group: ReplicationGroup) -> str:
    return ", ".join(group.members) or "no member"
