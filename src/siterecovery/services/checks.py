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

from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import InvalidInput
from siterecovery.providers.local import journal
from siterecovery.services.protection import find_point, find_point_by_id
from siterecovery.sites.base import Image, PointRef

Where = dict[str, Any]


def check_vm(
    ctx: Context, *, name: str, site: str | None = None, point: str | None = None
) -> dict[str, Any]:
    """Check the guest journal of a VM's disks, or of a recovery point's image."""
    report, where = _check(ctx, name, site, point)
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
    # One after the other, followers first: each is frozen after the ones before.
    for vm in _followers_first(ctx, [v for v in vms if v not in chosen], site):
        checked[vm] = _check(ctx, vm, site, None)
    for vm, point in chosen.items():
        checked[vm] = _check(ctx, vm, site, point.id)
    checked = {vm: checked[vm] for vm in vms}
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


def _check(
    ctx: Context, name: str, site: str | None, point: str | None
) -> tuple[journal.CheckReport, Where]:
    """The journal check of one VM's disks (disk 0 first) or of one of its
    points, run at the site where they are (only the report comes back)."""
    if point is not None:
        target = find_point(ctx, vm=name, point_id=point)
        image = Image(point=PointRef(name, target.files))
        found = ctx.site(target.site).check(image)
        return journal.CheckReport.from_dict(found), {"point": point, **found["where"]}
    vm = ctx.store.get_vm(name=name, site=site)
    found = ctx.site(vm.site).check(Image(vm=vm))
    return journal.CheckReport.from_dict(found), found["where"]
