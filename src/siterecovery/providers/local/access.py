"""The local provider's :class:`~siterecovery.disk.tracking.DiskAccess`: a VM's
disks served by one qemu-storage-daemon (the running VM's own, or a transient
one), change tracking by its persistent dirty bitmaps and views by fleecing
(:mod:`siterecovery.disk.checkpoints`)."""

from __future__ import annotations

import fcntl
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from siterecovery.disk import qemu_img
from siterecovery.disk.checkpoints import Tracker, freeze_together
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qmp import QmpClient
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.disk.tracking import VIEW_PREFIX, ChangeTracker, View
from siterecovery.domain.errors import InternalError


@dataclass(frozen=True, slots=True)
class QsdDiskAccess:
    """``nodes`` maps a disk name to its block node (also its NBD export);
    ``work_dir`` holds the views' temporary fleece images."""

    qmp: QmpClient
    nbd_socket: Path
    nodes: dict[str, str]
    work_dir: Path
    running: bool

    @property
    def key(self) -> str:
        return str(self.qmp.path)

    def open(self, disk: str, *, writable: bool = False) -> NbdDevice:
        return NbdDevice.connect(self.nbd_socket, self.nodes[disk], writable=writable)

    def allocated(self, disk: str) -> int:
        with self.open(disk) as device:
            return sum(e.length for e in device.extents() if not e.zero)

    def trackers(self, *, prefix: str = VIEW_PREFIX) -> dict[str, ChangeTracker]:
        return {
            disk: Tracker(self.qmp, node, self.work_dir, self.nbd_socket, prefix=prefix)
            for disk, node in self.nodes.items()
        }

    def freeze(
        self,
        requests: Sequence[tuple[ChangeTracker, Sequence[str]]],
        tag: str,
        *,
        new_checkpoint: str | None,
        granularity: int | None = None,
    ) -> list[View]:
        own: list[tuple[Tracker, Sequence[str]]] = []
        for tracker, since in requests:
            if not isinstance(tracker, Tracker) or tracker.nbd_socket != self.nbd_socket:
                raise InternalError(detail=f"a tracker of another disk server: {tracker!r}")
            own.append((tracker, since))
        views = freeze_together(own, tag, new_checkpoint=new_checkpoint, granularity=granularity)
        return list(views)


@contextmanager
def vm_lock(vm_dir: Path) -> Iterator[None]:
    """The VM's lock between threads and processes (an flock on ``VM/.lock``)."""
    path = vm_dir / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def transient_access(
    run_dir: Path, specs: list[DiskSpec], work_dir: Path
) -> Iterator[QsdDiskAccess]:
    """A stopped VM's disks served by a transient daemon in ``run_dir`` (or the
    one an engine that died mid-access left, with its views), stopped cleanly
    (SIGTERM) afterwards. The caller holds the VM's lock."""
    transient = StorageDaemon.attach(run_dir)
    if transient is None:
        transient = StorageDaemon.start(run_dir, specs)
    nodes = {spec.node: spec.node for spec in specs}
    try:
        yield QsdDiskAccess(transient.qmp(), transient.nbd_socket, nodes, work_dir, False)
    finally:
        transient.stop()


def stop_leftover_access(run_dir: Path, *, timeout: float = 30.0) -> None:
    """Stop the transient daemon in ``run_dir`` that an engine which died
    mid-access left on a VM's disks (the caller holds the VM's lock, so no
    live access owns it). Nothing to do when there is none."""
    leftover = StorageDaemon.attach(run_dir)
    if leftover is not None:
        leftover.stop(timeout=timeout)


def backing_files(disks: Iterable[Path]) -> set[Path]:
    """The files the qcow2 ``disks`` read through (their backing chains, less
    the disks themselves), resolved; a disk that does not exist has none."""
    found: set[Path] = set()
    for path in disks:
        if path.exists():
            found.update(p.resolve() for p in qemu_img.backing_chain(path)[1:])
    return found
