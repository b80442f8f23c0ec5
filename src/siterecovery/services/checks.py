"""``vm check``: the guest journal of a VM's disks, or of recovery points.

A running VM's disks change while they are read, so reading them straight
would catch records half written and report corruption that is not there. A
running VM is therefore checked through a point-in-time view of its disks (the
fleece of a replication pass, taken in one QMP transaction for all of a VM's
disks) that touches no checkpoint: replication's change tracking is left as it
was. Stopped VMs and recovery points do not change and are read as they are.

Several VMs checked together (replication groups, linked workloads) are frozen
followers first: a record of a follower only names a record its leader had
already acknowledged, so a leader frozen later holds every record linked to.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.checkpoints import CHECK_PREFIX, PointInTimeView, Tracker, freeze_together
from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.model import Vm
from siterecovery.providers.base import DiskAccess
from siterecovery.providers.local import journal
from siterecovery.services.context import Context
from siterecovery.services.protection import find_point, find_point_by_id, open_all, point_devices

CHECK_TAG = "check"
"""The tag of a check's views: one check at a time per daemon (see :data:`_locks`)."""

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()

Where = dict[str, Any]


def check_vm(
    ctx: Context, *, name: str, site: str | None = None, point: str | None = None
) -> dict[str, Any]:
    """Check the guest journal of a VM's disks, or of a recovery point's image."""
    with _image(ctx, name, site, point) as (devices, where):
        report = journal.check(devices)
    return {**report.to_dict(), "vm": name, **where}


def check_together(
    ctx: Context, *, vms: list[str], site: str | None = None, points: list[str] | None = None
) -> dict[str, Any]:
    """Check several VMs (live, or the given points of some) and their links: no
    record of one may depend on a record another lacks (replication groups).
    A VM named twice is checked once (one view of it at a time)."""
    vms = list(dict.fromkeys(vms))
    chosen = {p.vm: p for p in (find_point_by_id(ctx, point_id=i) for i in points or [])}
    stray = sorted(set(chosen) - set(vms))
    if stray:
        raise InvalidInput(field="point", reason=f"points of {', '.join(stray)}: name those VMs")
    checked: dict[str, tuple[journal.CheckReport, Where]] = {}
    with ExitStack() as stack:
        images = {}
        for vm in _followers_first(ctx, [v for v in vms if v not in chosen], site):
            images[vm] = stack.enter_context(_image(ctx, vm, site, None))
        for vm, point in chosen.items():
            images[vm] = stack.enter_context(_image(ctx, vm, site, point.id))
        for vm in vms:
            devices, where = images[vm]
            checked[vm] = (journal.check(devices), where)
    dangling = journal.dangling_links({vm: report for vm, (report, _) in checked.items()})
    return {
        "consistent": not dangling and all(r.consistent for r, _ in checked.values()),
        "vms": {vm: {**r.to_dict(), "vm": vm, **where} for vm, (r, where) in checked.items()},
        "links": {"consistent": not dangling, "errors": dangling},
    }


def _followers_first(ctx: Context, names: list[str], site: str | None) -> list[str]:
    """``names`` ordered so that a VM comes before the VMs its workload follows."""
    links = {name: ctx.store.get_vm(name=name, site=site).workload_link for name in names}

    def depth(name: str) -> int:
        chain = [name]
        while (leader := links.get(chain[-1])) in links and leader not in chain:
            chain.append(leader or "")
        return len(chain)

    return sorted(names, key=depth, reverse=True)


@contextmanager
def _image(
    ctx: Context, name: str, site: str | None, point: str | None
) -> Iterator[tuple[list[BlockDevice], Where]]:
    """The disks to check (disk 0 first) and where they are, open while inside."""
    if point is not None:
        target = find_point(ctx, vm=name, point_id=point)
        with point_devices(ctx, target) as devices:
            yield devices, {"point": point, "site": target.site, "image": "recovery point"}
        return
    vm = ctx.store.get_vm(name=name, site=site)
    owner = ctx.store.get_site(name=vm.site)
    with ctx.provider(owner).disk_access(owner, vm) as access:
        if not access.running:
            # Fast path: nothing writes to a stopped VM's disks.
            with open_all(access.nbd_socket, [access.nodes[d.name] for d in vm.disks]) as devices:
                yield devices, {"site": vm.site, "image": "stopped VM"}
            return
        with _frozen(access, vm) as devices:
            yield devices, {"site": vm.site, "image": "point-in-time view of the running VM"}


@contextmanager
def _frozen(access: DiskAccess, vm: Vm) -> Iterator[list[BlockDevice]]:
    """Point-in-time views of a running VM's disks, all of one instant.

    Checks of one daemon take turns (the lock), so the views a check finds
    under its prefix when it starts are leftovers of a crashed check.
    """
    trackers = [
        Tracker(
            access.qmp, access.nodes[d.name], access.work_dir, access.nbd_socket,
            prefix=CHECK_PREFIX,
        )
        for d in vm.disks
    ]  # fmt: skip
    with _lock(str(access.qmp.path)), ExitStack() as stack:
        for tracker in trackers:
            tracker.cleanup_views()
        views: list[PointInTimeView] = freeze_together(
            [(tracker, []) for tracker in trackers], CHECK_TAG, new_checkpoint=None
        )
        for view in views:
            stack.callback(view.release)
        yield [stack.enter_context(view.open()) for view in views]


def _lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())
