"""The libvirt/KVM :class:`~siterecovery.providers.base.Hypervisor`.

A VM of ours is a persistent libvirt domain of the same name on its host
(``uri_of(vm.host)``, or the URI in the site's ``hosts.json``:
:class:`~siterecovery.providers.hosts.HostBook`), with its files in the
site's directory, which every host of the site must see at the same path
(shared storage, as for the replica store)::

    SITE/vms/VM/vm.json              the VM definition (model.Vm.to_dict())
    SITE/vms/VM/disks/DISK.qcow2     its disks (vda, vdb... in the VM's order)
    SITE/vms/VM/inconsistent         present while an interrupted sync owns the disks
    SITE/vms/VM/guest.json           the last guest status seen (guest_state)
    SITE/vms/VM/console.log          the first serial port
    SITE/vms/VM/fleece/              scratch images of point-in-time views

Change tracking: a checkpoint ``NAME`` of ours is a persistent dirty bitmap
``sr-NAME`` in each qcow2 *and* a libvirt checkpoint ``sr-NAME`` over them:
the bitmaps are the truth, libvirt's metadata is redefined from them before
each start and after each offline change (:mod:`.metadata`).

A forced stop (``destroy`` after the timeout) is logged as a warning and
recorded in ``guest.json`` (``stop: forced``). libvirt's destroy SIGTERMs qemu,
which then closes its images cleanly and stores the bitmaps: they are right
about the disk (the guest lost its unflushed writes, which never reached the
disk); if qemu had to be SIGKILLed, the bitmaps stay flagged ``in-use`` and
qemu loads them inconsistent at the next start, so the next pass sees them
inconsistent and falls back to a checksum sync. The bitmaps' flags after the
stop are logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped, import-not-found, unused-ignore]

from siterecovery.disk import qemu_img
from siterecovery.disk.checkpoints import BITMAP_PREFIX
from siterecovery.disk.qsd import DiskSpec as ServedDisk
from siterecovery.disk.tracking import DiskAccess
from siterecovery.domain.errors import (
    AlreadyExists,
    GuestError,
    HostNotFound,
    HypervisorError,
    InvalidInput,
    SwitchMissing,
    VmBusy,
    VmInconsistent,
    VmNotFound,
)
from siterecovery.domain.model import DiskDef, OsType, Site, Vm, VmPower
from siterecovery.keys.master import sync_dir, write_private
from siterecovery.providers.hosts import HostBook
from siterecovery.providers.libvirt.connection import Connection, Domain, connect
from siterecovery.providers.libvirt.domains import (
    GUEST_AGENT_CHANNEL,
    DirectBoot,
    DiskSpec,
    DomainSpec,
    NicSpec,
    domain_xml,
    parse_domain,
    power_of,
)
from siterecovery.providers.libvirt.guest_agent import LibvirtGuestAgent, read_state, save_state
from siterecovery.providers.libvirt.guest_image import GuestImage, build_guest, detect_accel
from siterecovery.providers.libvirt.metadata import bitmap_flags, redefine_checkpoints
from siterecovery.providers.libvirt.tracking import LibvirtDiskAccess
from siterecovery.providers.local.access import (
    backing_files,
    stop_leftover_access,
    transient_access,
    vm_lock,
)
from siterecovery.providers.local.provider import run_dir

log = logging.getLogger(__name__)

MiB = 2**20
POLL = 0.2
"""Seconds between two looks at a stopping domain's state."""
ADOPTED_FILE = "adopted.json"
"""``SITE/vms/VM/adopted.json``: an adopted domain's disks, where its owner put them."""
_STOPPED_SEQ = "sr-workload stopped seq="
"""The lab guest's last console line, with its final acknowledged seq."""


class LibvirtHypervisor:
    """VMs as libvirt domains on the site's hosts (see the module's docstring).

    ``uri_of(host)`` is a host's libvirt URI (None: the one the site's
    ``hosts.json`` gives, written by ``host add --kind kvm --uri``).
    ``virt_type`` is the domains' type (``kvm``, or ``qemu`` for TCG; None:
    ``kvm`` when the host's capabilities offer it).
    ``guest_image()`` gives the lab guest that VMs with ``workload`` boot.
    Connections are opened once per URI and shared by threads.
    """

    kind = "kvm"

    def __init__(
        self,
        uri_of: Callable[[str], str] | None = None,
        *,
        virt_type: str | None = None,
        guest_image: Callable[[], GuestImage] = build_guest,
    ) -> None:
        self._uri_of = uri_of
        self._virt_type = virt_type
        self._guest_image = guest_image
        self._connections: dict[str, Connection] = {}
        self._connections_lock = threading.Lock()

    # Definition --------------------------------------------------------------------

    def create_vm(
        self,
        site: Site,
        vm: Vm,
        *,
        bases: dict[str, Path] | None = None,
        checkpoint: str | None = None,
    ) -> None:
        conn = self._conn(site, vm)
        nics = self._nics(conn, vm)  # Refused before anything is made.
        existing = self._find(conn, vm)
        if existing is not None and not self._is_ours(site, vm, existing):
            raise AlreadyExists(kind="libvirt domain", name=vm.name)
        vm_dir = self._vm_dir(site, vm)
        (vm_dir / "disks").mkdir(parents=True, exist_ok=True)
        for disk in vm.disks:
            self._create_disk(site, vm, disk.name, disk.size, (bases or {}).get(disk.name),
                              checkpoint)  # fmt: skip
        (vm_dir / "vm.json").write_text(json.dumps(vm.to_dict(), indent=2) + "\n")
        with self._lock(site, vm):
            domain = existing or conn.define(domain_xml(self._spec(conn, site, vm, nics)))
            if domain.state() == "shutoff":
                redefine_checkpoints(domain, self._images(site, vm))

    def _create_disk(
        self, site: Site, vm: Vm, disk: str, size: int, base: Path | None, checkpoint: str | None
    ) -> None:
        path = self.disk_path(site, vm, disk)
        if path.exists():
            return
        partial = path.with_suffix(".qcow2.partial")
        qemu_img.create(partial, None if base else size, backing=base)
        if checkpoint is not None:
            qemu_img.add_bitmap(partial, BITMAP_PREFIX + checkpoint, enable=True)
        partial.rename(path)

    def replace_disks(self, site: Site, vm: Vm) -> None:
        """Give a stopped VM new blank disks (their checkpoints go with the old ones)."""
        with self._lock(site, vm):
            domain = self._stopped(site, vm, "replace its disks")
            for disk in vm.disks:
                path = self.disk_path(site, vm, disk.name)
                partial = path.with_suffix(".qcow2.partial")
                qemu_img.create(partial, disk.size)
                partial.replace(path)
            if domain is not None:
                redefine_checkpoints(domain, self._images(site, vm))

    def add_checkpoint(self, site: Site, vm: Vm, checkpoint: str) -> None:
        """Start change tracking on a stopped VM's disks (a bitmap in each qcow2,
        and the libvirt checkpoint over them). Idempotent."""
        with self._lock(site, vm):
            domain = self._stopped(site, vm, "add a checkpoint")
            for disk in vm.disks:
                path = self.disk_path(site, vm, disk.name)
                if BITMAP_PREFIX + checkpoint not in {b.name for b in qemu_img.bitmaps(path)}:
                    qemu_img.add_bitmap(path, BITMAP_PREFIX + checkpoint, enable=True)
            if domain is not None:
                redefine_checkpoints(domain, self._images(site, vm))

    def delete_vm(self, site: Site, vm: Vm) -> None:
        """Destroy the domain if it runs, undefine it with its checkpoint metadata and
        delete its files. Idempotent, also when the domain is gone already; a
        domain of that name that is not ours (other disks) is left alone."""
        with self._lock(site, vm):
            self._stop_leftover_access(site, vm)
            domain = self._find(self._conn(site, vm), vm)
            if domain is not None and self._is_ours(site, vm, domain):
                domain.destroy()
                with contextlib.suppress(VmNotFound):
                    domain.undefine()
        shutil.rmtree(self._vm_dir(site, vm), ignore_errors=True)
        shutil.rmtree(self._access_run(site, vm), ignore_errors=True)

    # Power -------------------------------------------------------------------------

    def start_vm(self, site: Site, vm: Vm) -> None:
        """Start the domain (defined again from the VM if its host lost it). Idempotent."""
        if self.is_inconsistent(site, vm):
            raise VmInconsistent(vm=vm.name, site=site.name)
        with self._lock(site, vm):
            conn = self._conn(site, vm)
            domain = self._find(conn, vm)
            if domain is None:
                domain = conn.define(domain_xml(self._spec(conn, site, vm, self._nics(conn, vm))))
            if domain.state() != "shutoff":
                return
            self._stop_leftover_access(site, vm)
            redefine_checkpoints(domain, self._images(site, vm))
            domain.start()

    def stop_vm(self, site: Site, vm: Vm, *, timeout: float = 30.0) -> None:
        """Stop cleanly: the guest agent's shutdown, else ACPI (also at half the
        timeout), and ``destroy`` after ``timeout`` s (logged, recorded in
        guest.json: see the module's docstring). Idempotent."""
        with self._lock(site, vm):
            self._stop_leftover_access(site, vm)
            domain = self._find(self._conn(site, vm), vm)
            if domain is None or domain.state() == "shutoff":
                return
            deadline = time.monotonic() + timeout
            agent = self._agent_of(site, vm, domain)
            with contextlib.suppress(GuestError):
                if agent is not None:
                    agent.status()  # Recorded in guest.json: the seq at the stop.
            asked = self._ask_shutdown(domain, agent=agent is not None)
            halfway = time.monotonic() + timeout / 2
            if not (asked and self._wait_off(domain, halfway)):
                self._ask_shutdown(domain, agent=False)
            if self._wait_off(domain, deadline):
                self._record_stop(site, vm, "clean")
                return
            domain.destroy()
            self._record_stop(site, vm, "forced")
            flags = bitmap_flags(self._images(site, vm))
            log.warning(
                "VM '%s' did not shut down within %.0f s: destroyed (forced stop); "
                "its bitmaps after the stop: %s", vm.name, timeout, flags,
            )  # fmt: skip

    def _ask_shutdown(self, domain: Domain, *, agent: bool) -> bool:
        """Ask the guest to power off (agent or ACPI); whether it was accepted."""
        try:
            domain.shutdown(agent=agent)
        except (GuestError, HypervisorError) as error:
            log.info("shutdown of '%s' (%s) refused: %s", domain.name,
                     "agent" if agent else "ACPI", error)  # fmt: skip
            return False
        return True

    def _wait_off(self, domain: Domain, deadline: float) -> bool:
        while domain.state() != "shutoff":
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True

    def _record_stop(self, site: Site, vm: Vm, how: str) -> None:
        path = self._vm_dir(site, vm) / "guest.json"
        state: dict[str, Any] = dict(read_state(path))
        final = _final_seq(self._vm_dir(site, vm) / "console.log")
        if final is not None and (how == "clean" or "seq" not in state):
            state["seq"] = max(final, int(state.get("seq", 0)))
        save_state(path, state, stop=how)

    def power(self, site: Site, vm: Vm) -> VmPower:
        if self.is_inconsistent(site, vm):
            return VmPower.INCONSISTENT
        domain = self._find(self._conn(site, vm), vm)
        return VmPower.STOPPED if domain is None else power_of(domain.state())

    # Guest -------------------------------------------------------------------------

    def guest(self, site: Site, vm: Vm) -> LibvirtGuestAgent | None:
        """The agent of a running domain whose agent channel is connected and
        answers; None otherwise (crash-consistent points)."""
        domain = self._find(self._conn(site, vm), vm)
        if domain is None or domain.state() == "shutoff":
            return None
        return self._agent_of(site, vm, domain)

    def _agent_of(self, site: Site, vm: Vm, domain: Domain) -> LibvirtGuestAgent | None:
        if not _agent_connected(domain.xml()):
            return None
        state_file = self._vm_dir(site, vm) / "guest.json"
        return LibvirtGuestAgent.probe(domain, lambda: self._domain(site, vm), state_file)

    def guest_state(self, site: Site, vm: Vm) -> dict[str, object]:
        """The last guest status seen (``seq``: last acknowledged record; at a clean
        stop of the lab guest, its final one from the console), ``stop``
        (``clean``/``forced``) after a stop; {} when never seen."""
        return read_state(self._vm_dir(site, vm) / "guest.json")

    # Disks -------------------------------------------------------------------------

    @contextmanager
    def disk_access(self, site: Site, vm: Vm) -> Iterator[DiskAccess]:
        work_dir = self._vm_dir(site, vm) / "fleece"
        work_dir.mkdir(parents=True, exist_ok=True)
        domain = self._find(self._conn(site, vm), vm)
        if domain is not None and domain.state() != "shutoff":
            # Fast path: libvirt serves the running domain's disks (pull-mode backups).
            yield LibvirtDiskAccess(domain, self._targets(site, vm), work_dir)
            return
        # Slow path: a transient qemu-storage-daemon on the images (or the one an
        # engine that died mid-access left), as the local provider's; libvirt's
        # checkpoint metadata is redefined from the bitmaps afterwards.
        with self._lock(site, vm):
            try:
                with transient_access(self._access_run(site, vm), self._served(site, vm),
                                      work_dir) as found:  # fmt: skip
                    yield found
            finally:
                if domain is not None:
                    redefine_checkpoints(domain, self._images(site, vm))

    def disk_image(self, site: Site, vm: Vm, disk: str) -> Path:
        return self.disk_path(site, vm, disk)

    def disk_path(self, site: Site, vm: Vm, disk: str) -> Path:
        adopted = self._adopted(site, vm).get(disk)
        if adopted is not None:
            return Path(adopted["path"])
        return self._vm_dir(site, vm) / "disks" / f"{disk}.qcow2"

    # Adoption ------------------------------------------------------------------------

    def adopt(self, site: Site, host: str, name: str) -> Vm:
        """Make the existing domain ``name`` of ``host`` (defined by its owner,
        not by us) a VM of the site, its disks left where they are
        (``SITE/vms/NAME/adopted.json`` records them). Its hardware is kept in
        the VM (vCPUs, memory, each disk's bus, each NIC's switch and model) so
        that a failed-over copy has the same. Every disk must be a qcow2 file:
        change tracking lives in qcow2 bitmaps. Idempotent; refused with
        InvalidInput (nothing written) for a disk that cannot be tracked."""
        probe = Vm(name=name, site=site.name, host=host, os=OsType.LINUX, disks=(), nics=())
        domain = self._domain(site, probe)
        spec = parse_domain(domain.xml(inactive=True))
        for disk in spec.disks:
            if disk.path is None or disk.format != "qcow2" or str(disk.path).startswith("/dev/"):
                raise InvalidInput(
                    field="vm",
                    reason=(
                        f"disk {disk.target} of domain '{name}' is {disk.format} at "
                        f"{disk.path or 'the network'}: only qcow2 files are tracked; convert it "
                        f"(`qemu-img convert -O qcow2 ...`) and point the domain at the copy"
                    ),
                )
        if any(nic.switch is None for nic in spec.nics):
            raise InvalidInput(
                field="vm", reason=f"a NIC of domain '{name}' is on no network or bridge"
            )
        vm = Vm(
            name=name, site=site.name, host=host, os=OsType.LINUX,
            disks=tuple(
                DiskDef(f"d{i}", domain.disk_capacity(d.target) or 0, d.bus)
                for i, d in enumerate(spec.disks)
            ),
            nics=tuple(str(n.switch) for n in spec.nics),
            nic_models=tuple(n.model or "virtio" for n in spec.nics),
            cpus=spec.vcpus, memory_mib=spec.memory // MiB, workload=self._is_lab_guest(spec),
        )  # fmt: skip
        vm_dir = self._vm_dir(site, vm)
        vm_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "domain": name,
            "disks": {
                f"d{i}": {"path": str(d.path), "target": d.target} for i, d in enumerate(spec.disks)
            },
        }
        write_private(vm_dir / ADOPTED_FILE, (json.dumps(record, indent=2) + "\n").encode())
        (vm_dir / "vm.json").write_text(json.dumps(vm.to_dict(), indent=2) + "\n")
        return vm

    def _is_lab_guest(self, spec: DomainSpec) -> bool:
        """Whether the domain boots the lab guest's kernel (its init runs the
        journal workload: a lab VM, whose copies boot it too)."""
        if spec.boot is None:
            return False
        try:
            image = self._guest_image()
        except GuestError:
            return False
        return Path(spec.boot.kernel) == Path(image.kernel)

    def reads_through(self, site: Site, vm: Vm) -> set[Path]:
        return backing_files(self.disk_path(site, vm, d.name) for d in vm.disks)

    def is_inconsistent(self, site: Site, vm: Vm) -> bool:
        return (self._vm_dir(site, vm) / "inconsistent").exists()

    def set_inconsistent(self, site: Site, vm: Vm, value: bool) -> None:
        """Create or remove the marker, fsync'd (file and directory) before returning."""
        marker = self._vm_dir(site, vm) / "inconsistent"
        marker.parent.mkdir(parents=True, exist_ok=True)
        if value:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            marker.unlink(missing_ok=True)
        sync_dir(marker.parent)

    def close(self) -> None:
        """Close the cached connections. Idempotent."""
        with self._connections_lock:
            connections, self._connections = self._connections, {}
        for conn in connections.values():
            conn.close()

    # Helpers -----------------------------------------------------------------------

    def _spec(self, conn: Connection, site: Site, vm: Vm, nics: tuple[NicSpec, ...]) -> DomainSpec:
        boot = None
        if vm.workload:
            image = self._guest_image()
            rate = float(os.environ.get("SITERECOVERY_WORKLOAD_RATE", "20"))
            boot = DirectBoot(image.kernel, image.initramfs, image.cmdline(rate=rate))
        buses = {d.name: d.bus for d in vm.disks}
        disks = tuple(
            DiskSpec(target, self.disk_path(site, vm, disk), buses[disk])
            for disk, target in self._targets(site, vm).items()
        )
        return DomainSpec(
            name=vm.name, vcpus=vm.cpus, memory=vm.memory_mib * MiB, disks=disks, nics=nics,
            guest_agent=True, boot=boot, machine="q35", virt_type=self._virt(conn, vm),
            console_log=self._vm_dir(site, vm) / "console.log",
        )  # fmt: skip

    def _virt(self, conn: Connection, vm: Vm) -> str:
        """``kvm`` when the host offers it, else ``qemu`` (TCG). The lab guest
        (a VM with ``workload``) also needs KVM to boot a stock kernel here,
        which ``/dev/kvm`` does not promise: the canary boot decides
        (:func:`detect_accel`, once per process, on this machine — the lab's
        hosts are this machine's private libvirtds)."""
        if self._virt_type is not None:
            return self._virt_type
        caps = ET.fromstring(conn.capabilities())
        if caps.find("guest/arch[@name='x86_64']/domain[@type='kvm']") is None:
            return "qemu"
        if vm.workload and detect_accel(self._guest_image()) != "kvm":
            return "qemu"
        return "kvm"

    def _nics(self, conn: Connection, vm: Vm) -> tuple[NicSpec, ...]:
        """A NIC per switch of the VM, on the libvirt network it names (by its own
        name or its bridge's); SwitchMissing when the host has no such switch."""
        networks: dict[str, str] = {}
        for xml in conn.network_xmls():
            root = ET.fromstring(xml)
            name = (root.findtext("name") or "").strip()
            bridge = root.find("bridge")
            networks[name] = name
            if bridge is not None and bridge.get("name"):
                networks.setdefault(bridge.get("name", ""), name)
        missing = [switch for switch in vm.nics if switch not in networks]
        if missing:
            raise SwitchMissing(host=vm.host, switch=missing[0], vm=vm.name)
        models = list(vm.nic_models) + ["virtio"] * (len(vm.nics) - len(vm.nic_models))
        return tuple(
            NicSpec(None, networks[switch], model)
            for switch, model in zip(vm.nics, models, strict=False)
        )

    def _images(self, site: Site, vm: Vm) -> dict[str, Path]:
        """Guest device -> image of each disk, in the VM's order."""
        return {t: self.disk_path(site, vm, disk) for disk, t in self._targets(site, vm).items()}

    def _targets(self, site: Site, vm: Vm) -> dict[str, str]:
        """Disk name -> guest device (vda, vdb... ; an adopted domain's own), in
        the VM's order."""
        adopted = self._adopted(site, vm)
        return {
            disk.name: adopted[disk.name]["target"] if disk.name in adopted else _target(index)
            for index, disk in enumerate(vm.disks)
        }

    def _adopted(self, site: Site, vm: Vm) -> dict[str, dict[str, str]]:
        """An adopted domain's disks where they were (``adopted.json``), {} for ours."""
        try:
            doc = json.loads((self._vm_dir(site, vm) / ADOPTED_FILE).read_text())
        except FileNotFoundError:
            return {}
        return {str(k): dict(v) for k, v in doc["disks"].items()}

    def _is_ours(self, site: Site, vm: Vm, domain: Domain) -> bool:
        """Whether the domain's disks are this VM's images (else a domain of the
        same name that someone else made: never touched)."""
        paths = {d.path for d in parse_domain(domain.xml(inactive=True)).disks}
        return self.disk_path(site, vm, vm.disks[0].name) in paths if vm.disks else not paths

    def _stopped(self, site: Site, vm: Vm, what: str) -> Domain | None:
        """The domain, refused (VmBusy) unless stopped; None when not defined."""
        self._stop_leftover_access(site, vm)
        domain = self._find(self._conn(site, vm), vm)
        if domain is not None and domain.state() != "shutoff":
            raise VmBusy(vm=vm.name, state="running", hint=f"stop it to {what}")
        return domain

    def _find(self, conn: Connection, vm: Vm) -> Domain | None:
        try:
            return conn.domain(vm.name)
        except VmNotFound:
            return None

    def _domain(self, site: Site, vm: Vm) -> Domain:
        return self._conn(site, vm).domain(vm.name)

    def _conn(self, site: Site, vm: Vm) -> Connection:
        """The open connection to the VM's host (reopened when it died)."""
        uri = self._uri(site, vm.host)
        with self._connections_lock:
            conn = self._connections.get(uri)
            if conn is not None and _alive(conn):
                return conn
            if conn is not None:  # dead: forgotten before a new one is tried
                self._connections.pop(uri).close()
            conn = self._connections[uri] = connect(uri)
            return conn

    def _uri(self, site: Site, host: str) -> str:
        if self._uri_of is not None:
            return self._uri_of(host)
        entry = HostBook(site.path).get(host)
        if entry is None or entry.uri is None:
            raise HostNotFound(name=host)
        return entry.uri

    def _served(self, site: Site, vm: Vm) -> list[ServedDisk]:
        return [ServedDisk(node=d.name, path=self.disk_path(site, vm, d.name)) for d in vm.disks]

    def _vm_dir(self, site: Site, vm: Vm) -> Path:
        return Path(site.path) / "vms" / vm.name

    def _access_run(self, site: Site, vm: Vm) -> Path:
        return run_dir(site, f"access-{vm.name}")

    def _stop_leftover_access(self, site: Site, vm: Vm) -> None:
        stop_leftover_access(self._access_run(site, vm))

    def _lock(self, site: Site, vm: Vm) -> AbstractContextManager[None]:
        return vm_lock(self._vm_dir(site, vm))


def _target(index: int) -> str:
    """vda, vdb, ..., vdz, vdaa, vdab... (the kernel's naming)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "vd" + letters


def _agent_connected(xml: str) -> bool:
    """Whether the live XML shows the guest agent's channel connected (the guest
    opened its end of the port)."""
    for channel in ET.fromstring(xml).iterfind("devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == GUEST_AGENT_CHANNEL:
            return target.get("state") == "connected"
    return False


def _final_seq(console: Path) -> int | None:
    """The final acknowledged seq the lab guest printed at its shutdown, if any."""
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return None
    lines = [line for line in text.splitlines() if _STOPPED_SEQ in line]
    if not lines:
        return None
    word = lines[-1].split(_STOPPED_SEQ, 1)[1].split()[0]
    return int(word) if word.isdigit() else None


def _alive(conn: Connection) -> bool:
    """Whether a cached connection still reaches its daemon. ``isAlive`` goes on
    saying yes after the daemon died (no keepalive without an event loop), so
    one cheap round trip asks (a restarted host's daemon: a new connection)."""
    if conn.raw is None:  # closed
        return False
    try:
        return bool(conn.raw.isAlive()) and conn.raw.getLibVersion() > 0
    except libvirt.libvirtError:
        return False
