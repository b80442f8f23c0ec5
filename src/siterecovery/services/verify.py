"""``verify``: compare an item's disks across its two sites, block by block.

Each side's disk is hashed where it lives (64 KiB blocks, xxh3-128) and only
the digest lists are compared; nothing else moves. The active side is the VM
where it runs (its guest quiesced while hashed, so the disk holds still); the
other side is the VM left there, or else the latest recovery point.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.digest import block_digests
from siterecovery.domain.errors import NoRecoveryPoint
from siterecovery.domain.model import Vm
from siterecovery.services.context import Context
from siterecovery.services.protection import open_all, point_devices

BLOCK = 64 * 1024
MAX_RANGES = 100


def verify(ctx: Context, *, vm: str) -> dict[str, Any]:
    item = ctx.store.get_item(vm=vm)
    active = ctx.store.get_vm(name=vm, site=item.active_site)
    with ExitStack() as stack:
        mine = stack.enter_context(_vm_devices(ctx, active, quiesce=True))
        other, label = _other_side(ctx, stack, vm, item.standby_site)
        disks = {disk.name: compare(mine[i], other[i]) for i, disk in enumerate(active.disks)}
    return {
        "vm": vm,
        "active": f"{vm}@{item.active_site}",
        "other": label,
        "block_size": BLOCK,
        "equal": all(d["equal"] for d in disks.values()),
        "disks": disks,
    }


def _other_side(
    ctx: Context, stack: ExitStack, vm: str, site: str
) -> tuple[list[BlockDevice], str]:
    found = ctx.store.find_vms(name=vm, site=site)
    if found:
        return stack.enter_context(_vm_devices(ctx, found[0], quiesce=False)), f"{vm}@{site}"
    points = ctx.store.list_points(vm=vm, site=site)
    if not points:
        raise NoRecoveryPoint(vm=vm, kind="", site=site)
    return stack.enter_context(point_devices(ctx, points[-1])), f"point {points[-1].id}"


@contextmanager
def _vm_devices(ctx: Context, vm: Vm, *, quiesce: bool) -> Iterator[list[BlockDevice]]:
    site = ctx.store.get_site(name=vm.site)
    provider = ctx.provider(site)
    guest = provider.guest(site, vm) if quiesce else None
    with ExitStack() as stack:
        if guest is not None:
            guest.quiesce(timeout=300.0)
            stack.callback(guest.thaw)
        access = stack.enter_context(provider.disk_access(site, vm))
        exports = [access.nodes[d.name] for d in vm.disks]
        yield stack.enter_context(open_all(access.nbd_socket, exports))


def compare(a: BlockDevice, b: BlockDevice) -> dict[str, Any]:
    """Digest lists of both disks compared; the differing byte ranges (merged)."""
    left, right = block_digests(a, BLOCK), block_digests(b, BLOCK)
    if a.size != b.size:
        return {"equal": False, "reason": f"sizes differ: {a.size} != {b.size}"}
    differing = np.flatnonzero(np.any(left != right, axis=1))
    ranges = _ranges(differing)
    return {
        "equal": len(differing) == 0,
        "blocks": int(left.shape[0]),
        "differing_blocks": len(differing),
        "differing_bytes": len(differing) * BLOCK,
        "ranges": [[start * BLOCK, count * BLOCK] for start, count in ranges[:MAX_RANGES]],
    }


def _ranges(indices: Any) -> list[tuple[int, int]]:
    """Runs of consecutive block indices as (first, count)."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    return [(int(run[0]), len(run)) for run in np.split(indices, breaks)]
