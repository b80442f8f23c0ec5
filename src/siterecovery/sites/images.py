"""Reading a site's images where they live: a VM's disks or a sealed point's,
for ``verify`` (block digests), ``vm check`` (the guest journal) and the
integrity proof of a point (whole-disk digests).

A running VM's disks change while they are read, so reading them straight
would catch records half written and report corruption that is not there. A
running VM is therefore read through point-in-time views of its disks (the
fleece of a replication pass, taken in one QMP transaction for all of a VM's
disks) that touch no checkpoint: replication's change tracking is left as it
was. A quiesced guest (``Image.quiesce``), stopped VMs and recovery points do
not change and are read as they are.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.tracking import CHECK_PREFIX, DiskAccess, View
from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.model import Site
from siterecovery.providers.base import Hypervisor
from siterecovery.providers.replicas import ReplicaStore
from siterecovery.sites.base import Image

CHECK_TAG = "check"
"""The tag of a read's views: one at a time per daemon (see :data:`_locks`)."""

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()

Where = dict[str, Any]


@contextmanager
def open_image(
    vms: Hypervisor, replicas: ReplicaStore, site: Site, image: Image
) -> Iterator[tuple[dict[str, BlockDevice], Where]]:
    """The disks of ``image`` by name (in the VM's order, or the point's
    disks sorted), read-only, and what was read, open while inside."""
    if image.point is not None:
        with ExitStack() as stack:
            devices: dict[str, BlockDevice] = {
                disk: stack.enter_context(replicas.open_point(site, image.point.item, disk, name))
                for disk, name in sorted(image.point.files.items())
            }
            yield devices, {"site": site.name, "image": "recovery point"}
        return
    vm = image.vm
    if vm is None:
        raise InvalidInput(field="image", reason="name a VM or a point")
    guest = vms.guest(site, vm) if image.quiesce else None
    with ExitStack() as stack:
        if guest is not None:
            guest.quiesce(timeout=300.0)
            stack.callback(guest.thaw)
        access = stack.enter_context(vms.disk_access(site, vm))
        if not access.running:
            # Nothing writes to a stopped VM's disks.
            devices = {d.name: stack.enter_context(access.open(d.name)) for d in vm.disks}
            yield devices, {"site": site.name, "image": "stopped VM"}
            return
        # A running VM is read through views of one instant (a hypervisor may
        # offer its running disks no other way); a quiesced guest goes on as
        # soon as they are taken.
        views = stack.enter_context(_frozen(access, [d.name for d in vm.disks]))
        if guest is not None:
            guest.thaw()
        what = "quiesced VM" if guest is not None else "running VM"
        yield views, {"site": site.name, "image": f"point-in-time view of the {what}"}


@contextmanager
def _frozen(access: DiskAccess, disks: list[str]) -> Iterator[dict[str, BlockDevice]]:
    """Point-in-time views of a running VM's disks, all of one instant.

    Reads of one daemon take turns (the lock), so the views a read finds
    under its prefix when it starts are leftovers of a crashed one.
    """
    found = access.trackers(prefix=CHECK_PREFIX)
    trackers = [found[d] for d in disks]
    with _lock(access.key), ExitStack() as stack:
        for tracker in trackers:
            tracker.cleanup_views()
        views: list[View] = access.freeze(
            [(tracker, []) for tracker in trackers], CHECK_TAG, new_checkpoint=None
        )
        for view in views:
            stack.callback(view.release)
        yield {d: stack.enter_context(view.open()) for d, view in zip(disks, views, strict=True)}


def _lock(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())
