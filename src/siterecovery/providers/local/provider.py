"""The ``local`` provider: a site is a directory, a VM a directory with qcow2 disks.

Layout of a site directory::

    SITE/site.json                         marker (provider, name)
    SITE/vms/VM/vm.json                    the VM definition (model.Vm.to_dict())
    SITE/vms/VM/disks/DISK.qcow2           its disks (persistent dirty bitmaps inside)
    SITE/vms/VM/inconsistent               present while an interrupted sync owns the disks
    SITE/vms/VM/fleece/                    temporary point-in-time views (replication)
    SITE/replicas/VM/DISK/pNNNNNN.qcow2    recovery-point chain of an item (points/chain.py)

A running VM is a detached ``qemu-storage-daemon`` (NBD + QMP on unix sockets in
a short run directory under ``$SITERECOVERY_RUN_DIR`` or ``/tmp/siterecovery-run``)
and, when the VM has guest tools, a guest workload process writing through NBD.
Both survive a restart of the engine daemon, like real VMs would.

A stopped VM's disks are opened by a *transient* daemon (run directory
``access-VM``) for the length of one :meth:`LocalProvider.disk_access`. It is
detached too: when the engine dies in the middle of an access, the daemon, its
point-in-time views and the consistency of its bitmaps survive, and the next
access (the resumed job's step) takes it over and resumes from the saved
offsets. Anything that touches the disks otherwise (start, stop, replace,
delete) first stops such a leftover.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from siterecovery.disk import qemu_img
from siterecovery.disk.checkpoints import BITMAP_PREFIX
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.disk.tracking import DiskAccess
from siterecovery.domain.errors import VmInconsistent
from siterecovery.domain.model import Site, Vm, VmPower
from siterecovery.providers.base import GuestAgent, register
from siterecovery.providers.local import guest
from siterecovery.providers.local.access import (
    QsdDiskAccess,
    backing_files,
    stop_leftover_access,
    transient_access,
    vm_lock,
)
from siterecovery.providers.local.paths import run_root
from siterecovery.providers.local.replicas import LocalReplicaStore


class LocalProvider:
    """Sites as directories of this machine: :class:`LocalHypervisor` VMs and
    :class:`~siterecovery.providers.local.replicas.LocalReplicaStore` chains."""

    kind = "local"

    def __init__(self) -> None:
        self.hypervisor = LocalHypervisor()
        self.replicas = LocalReplicaStore()

    def run_dir(self, site: Site, key: str) -> Path:
        return run_dir(site, key)

    def prepare_site(self, site: Site, *, storage: str = "block") -> None:
        root = Path(site.path)
        for sub in ("vms", "replicas"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        marker = root / "site.json"
        if not marker.exists():
            facts = {"name": site.name, "provider": self.kind, "storage": storage}
            marker.write_text(json.dumps(facts) + "\n")

    def storage(self, site: Site) -> str:
        """The kind of the site's disk storage: ``block`` unless site.json says otherwise."""
        try:
            marker = json.loads((Path(site.path) / "site.json").read_text())
        except (OSError, ValueError):
            return "block"
        return str(marker.get("storage", "block"))


class LocalHypervisor:
    """VMs as qemu-storage-daemon + guest workload processes on this machine."""

    kind = "local"

    def create_vm(
        self,
        site: Site,
        vm: Vm,
        *,
        bases: dict[str, Path] | None = None,
        checkpoint: str | None = None,
    ) -> None:
        vm_dir = self._vm_dir(site, vm.name)
        (vm_dir / "disks").mkdir(parents=True, exist_ok=True)
        for disk in vm.disks:
            path = self.disk_path(site, vm, disk.name)
            if path.exists():
                continue
            base = (bases or {}).get(disk.name)
            partial = path.with_suffix(".qcow2.partial")
            qemu_img.create(partial, None if base else disk.size, backing=base)
            if checkpoint is not None:
                qemu_img.add_bitmap(partial, BITMAP_PREFIX + checkpoint, enable=True)
            partial.rename(path)
        (vm_dir / "vm.json").write_text(json.dumps(vm.to_dict(), indent=2) + "\n")

    def replace_disks(self, site: Site, vm: Vm) -> None:
        """Give a stopped VM new blank disks (a full download starts from nothing)."""
        with self._lock(site, vm):
            self._stop_leftover_access(site, vm)
        for disk in vm.disks:
            path = self.disk_path(site, vm, disk.name)
            partial = path.with_suffix(".qcow2.partial")
            qemu_img.create(partial, disk.size)
            partial.replace(path)

    def add_checkpoint(self, site: Site, vm: Vm, checkpoint: str) -> None:
        """Start change tracking on a stopped VM's disks (a persistent bitmap each)."""
        with self._lock(site, vm):
            self._stop_leftover_access(site, vm)
        for disk in vm.disks:
            path = self.disk_path(site, vm, disk.name)
            names = {b.name for b in qemu_img.bitmaps(path)}
            if BITMAP_PREFIX + checkpoint not in names:
                qemu_img.add_bitmap(path, BITMAP_PREFIX + checkpoint, enable=True)

    def delete_vm(self, site: Site, vm: Vm) -> None:
        self.stop_vm(site, vm)
        shutil.rmtree(self._vm_dir(site, vm.name), ignore_errors=True)
        shutil.rmtree(self.run_dir(site, f"vm-{vm.name}"), ignore_errors=True)
        shutil.rmtree(self._access_run(site, vm), ignore_errors=True)

    def start_vm(self, site: Site, vm: Vm) -> None:
        if self.is_inconsistent(site, vm):
            raise VmInconsistent(vm=vm.name, site=site.name)
        with self._lock(site, vm):
            daemon = StorageDaemon.attach(self._vm_run(site, vm))
            if daemon is None:
                self._stop_leftover_access(site, vm)
                daemon = StorageDaemon.start(self._vm_run(site, vm), self._specs(site, vm))
            if vm.workload and self._guest_pid(site, vm) is None:
                self._spawn_workload(site, vm, daemon)

    def stop_vm(self, site: Site, vm: Vm, *, timeout: float = 30.0) -> None:
        with self._lock(site, vm):
            pid = self._guest_pid(site, vm)
            if pid is not None:
                guest.stop(pid, timeout=timeout)
            daemon = StorageDaemon.attach(self._vm_run(site, vm))
            if daemon is not None:
                daemon.stop(timeout=timeout)
            self._stop_leftover_access(site, vm, timeout=timeout)

    def power(self, site: Site, vm: Vm) -> VmPower:
        if self.is_inconsistent(site, vm):
            return VmPower.INCONSISTENT
        daemon = StorageDaemon.attach(self._vm_run(site, vm))
        return VmPower.RUNNING if daemon is not None else VmPower.STOPPED

    @contextmanager
    def disk_access(self, site: Site, vm: Vm) -> Iterator[DiskAccess]:
        work_dir = self._vm_dir(site, vm.name) / "fleece"
        work_dir.mkdir(parents=True, exist_ok=True)
        nodes = {d.name: d.name for d in vm.disks}
        daemon = StorageDaemon.attach(self._vm_run(site, vm))
        if daemon is not None:
            # Fast path: the running VM's own daemon serves the disks.
            yield QsdDiskAccess(daemon.qmp(), daemon.nbd_socket, nodes, work_dir, True)
            return
        # Slow path: a transient daemon on the images.
        with (
            self._lock(site, vm),
            transient_access(self._access_run(site, vm), self._specs(site, vm), work_dir) as found,
        ):
            yield found

    def guest(self, site: Site, vm: Vm) -> GuestAgent | None:
        if not vm.workload or self._guest_pid(site, vm) is None:
            return None
        return guest.WorkloadControl(self._vm_run(site, vm) / "workload.sock")

    def guest_state(self, site: Site, vm: Vm) -> dict[str, object]:
        """The workload's persisted state (last acknowledged seq…), or {}."""
        path = self._vm_dir(site, vm.name) / "workload.json"
        try:
            data: dict[str, object] = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def disk_image(self, site: Site, vm: Vm, disk: str) -> Path:
        return self.disk_path(site, vm, disk)

    def reads_through(self, site: Site, vm: Vm) -> set[Path]:
        return backing_files(self.disk_path(site, vm, d.name) for d in vm.disks)

    def disk_path(self, site: Site, vm: Vm, disk: str) -> Path:
        return self._vm_dir(site, vm.name) / "disks" / f"{disk}.qcow2"

    def run_dir(self, site: Site, key: str) -> Path:
        return run_dir(site, key)

    def is_inconsistent(self, site: Site, vm: Vm) -> bool:
        return (self._vm_dir(site, vm.name) / "inconsistent").exists()

    def set_inconsistent(self, site: Site, vm: Vm, value: bool) -> None:
        marker = self._vm_dir(site, vm.name) / "inconsistent"
        if value:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    def _vm_dir(self, site: Site, name: str) -> Path:
        return Path(site.path) / "vms" / name

    def _vm_run(self, site: Site, vm: Vm) -> Path:
        return self.run_dir(site, f"vm-{vm.name}")

    def _access_run(self, site: Site, vm: Vm) -> Path:
        return self.run_dir(site, f"access-{vm.name}")

    def _stop_leftover_access(self, site: Site, vm: Vm, *, timeout: float = 30.0) -> None:
        stop_leftover_access(self._access_run(site, vm), timeout=timeout)

    def _specs(self, site: Site, vm: Vm) -> list[DiskSpec]:
        return [DiskSpec(node=d.name, path=self.disk_path(site, vm, d.name)) for d in vm.disks]

    def _guest_pid(self, site: Site, vm: Vm) -> int | None:
        """The pid of the VM's live workload (its command line names our socket)."""
        run = self._vm_run(site, vm)
        try:
            pid = int((run / "workload.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(run / "workload.sock").encode() in cmdline else None

    def _spawn_workload(self, site: Site, vm: Vm, daemon: StorageDaemon) -> None:
        run = self._vm_run(site, vm)
        pid = guest.spawn(
            nbd_socket=daemon.nbd_socket,
            exports=[d.name for d in vm.disks],
            control=run / "workload.sock",
            state=self._vm_dir(site, vm.name) / "workload.json",
            log=self._vm_dir(site, vm.name) / "workload.log",
            rate=float(os.environ.get("SITERECOVERY_WORKLOAD_RATE", "20")),
            format_if_blank=True,
            # The followed VM at the same site: after a failover both run there.
            follow=self._vm_dir(site, vm.workload_link) / "workload.json"
            if vm.workload_link
            else None,
        )
        (run / "workload.pid").write_text(f"{pid}\n")

    def _lock(self, site: Site, vm: Vm) -> AbstractContextManager[None]:
        return vm_lock(self._vm_dir(site, vm.name))


def run_dir(site: Site, key: str) -> Path:
    """The short run directory of ``key`` at ``site`` (sockets, pid files)."""
    digest = hashlib.sha1(f"{Path(site.path).resolve()}|{key}".encode()).hexdigest()[:16]
    return run_root() / digest


@register("local")
def _factory() -> LocalProvider:
    return LocalProvider()
