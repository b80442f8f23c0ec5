"""VMs in and recovery points out through other hypervisors' disk formats.

``vm import`` makes a VM of images a Hyper-V (VHDX, VHD) or VMware (VMDK)
host produced, converted at the site of the host that will run it; ``point
export`` writes a recovery point in any of those formats at the site that
holds it. The bytes never cross to the engine; qemu-img does the conversion.
"""

from __future__ import annotations

from typing import Any

from siterecovery.context import Context
from siterecovery.disk import formats
from siterecovery.domain.errors import AlreadyExists, InvalidInput
from siterecovery.domain.model import Vm
from siterecovery.domain.values import check_name
from siterecovery.services import ownership
from siterecovery.services.inventory import os_type, vm_view
from siterecovery.services.protection import find_point
from siterecovery.sites.base import PointRef

MAX_IMPORT_DISKS = 8


def import_vm(
    ctx: Context,
    *,
    name: str,
    host: str,
    disks: list[str],
    switch: str | None = None,
    os: str = "linux",
    cpus: int = 1,
    memory_mib: int = 512,
) -> dict[str, Any]:
    """A new VM on ``host`` whose disks are the images ``disks`` (paths at the
    host's site), converted to its own qcow2 disks; stopped, ready to protect."""
    check_name("name", name)
    if not disks or len(disks) > MAX_IMPORT_DISKS:
        raise InvalidInput(
            field="disk", reason=f"name 1 to {MAX_IMPORT_DISKS} images (--disk FILE)"
        )
    if not 1 <= cpus <= 64 or not 64 <= memory_mib <= 1 << 20:
        raise InvalidInput(field="cpus", reason="1 to 64 vCPUs and 64 MiB to 1 TiB of memory")
    owner = ctx.store.get_host(name=host)
    if ctx.store.find_vms(name=name):
        raise AlreadyExists(kind="VM", name=name)
    nic = switch or (owner.switches[0] if owner.switches else None)
    if nic is not None and nic not in owner.switches:
        raise InvalidInput(
            field="switch",
            reason=f"host '{host}' has no switch '{nic}' ({', '.join(owner.switches)})",
        )
    vm = Vm(
        name=name, site=owner.site, host=owner.name, os=os_type(os), disks=(),
        nics=(nic,) if nic else (), cpus=cpus, memory_mib=memory_mib, workload=False,
    )  # fmt: skip
    made = ctx.site(owner.site).import_vm(vm, disks)
    ctx.store.add_vm(vm=made)
    return vm_view(ctx, made)


def export_point(ctx: Context, *, vm: str, point: str, fmt: str, to: str) -> dict[str, Any]:
    """Write recovery point ``point`` of ``vm`` to ``to`` (a path at the point's
    site) in ``fmt``. The item is held meanwhile, so that no retention merge
    changes the point's files under the copy (VM_BUSY while a job holds it)."""
    formats.export_format(fmt)
    target = find_point(ctx, vm=vm, point_id=point)
    owner = ownership.operation_owner("export")
    ownership.take(ctx, vm, owner)
    try:
        target = find_point(ctx, vm=vm, point_id=point)  # its files, now that it is held
        files = ctx.site(target.site).export_point(PointRef(vm, target.files), fmt, to)
    finally:
        ownership.release(ctx, vm, owner)
    return {"vm": vm, "point": point, "site": target.site, "format": fmt, "files": files}
