"""``verify``: compare an item's disks across its two sites, block by block.

Each side's disk is hashed where it lives (64 KiB blocks, xxh3-128) and only
the digest lists are compared; nothing else moves. The active side is the VM
where it runs (its guest quiesced while hashed, so the disk holds still); the
other side is the VM left there, or else the latest recovery point.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from siterecovery.context import Context
from siterecovery.disk.digest import DIGEST_SIZE
from siterecovery.domain.errors import NoRecoveryPoint
from siterecovery.sites.base import Image, PointRef

BLOCK = 64 * 1024
MAX_RANGES = 100


def verify(ctx: Context, *, vm: str) -> dict[str, Any]:
    item = ctx.store.get_item(vm=vm)
    active = ctx.store.get_vm(name=vm, site=item.active_site)
    image, label = _other_side(ctx, vm, item.standby_site)
    mine = ctx.site(item.active_site).digests(Image(vm=active, quiesce=True), block=BLOCK)
    other = ctx.site(item.standby_site).digests(image, block=BLOCK)
    disks = {disk.name: compare(mine[disk.name], other.get(disk.name)) for disk in active.disks}
    return {
        "vm": vm,
        "active": f"{vm}@{item.active_site}",
        "other": label,
        "block_size": BLOCK,
        "equal": all(d["equal"] for d in disks.values()),
        "disks": disks,
    }


def _other_side(ctx: Context, vm: str, site: str) -> tuple[Image, str]:
    """The VM left at ``site``, or else its latest recovery point there."""
    found = ctx.store.find_vms(name=vm, site=site)
    if found:
        return Image(vm=found[0]), f"{vm}@{site}"
    points = ctx.store.list_points(vm=vm, site=site)
    if not points:
        raise NoRecoveryPoint(vm=vm, kind="", site=site)
    latest = points[-1]
    return Image(point=PointRef(vm, latest.files)), f"point {latest.id}"


def compare(a: dict[str, Any], b: dict[str, Any] | None) -> dict[str, Any]:
    """Digest lists of both disks (each hashed at its own site) compared; the
    differing byte ranges (merged)."""
    if b is None:
        return {"equal": False, "reason": "the disk is missing on the other side"}
    if a["size"] != b["size"]:
        return {"equal": False, "reason": f"sizes differ: {a['size']} != {b['size']}"}
    left, right = _digests(a), _digests(b)
    differing = np.flatnonzero(np.any(left != right, axis=1))
    ranges = _ranges(differing)
    return {
        "equal": len(differing) == 0,
        "blocks": int(left.shape[0]),
        "differing_blocks": len(differing),
        "differing_bytes": len(differing) * BLOCK,
        "ranges": [[start * BLOCK, count * BLOCK] for start, count in ranges[:MAX_RANGES]],
    }


def _digests(found: dict[str, Any]) -> Any:
    raw = base64.b64decode(found["blocks"])
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, DIGEST_SIZE)


def _ranges(indices: Any) -> list[tuple[int, int]]:
    """Runs of consecutive block indices as (first, count)."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    return [(int(run[0]), len(run)) for run in np.split(indices, breaks)]
