"""LibvirtHypervisor through the Hypervisor protocol, on a private libvirtd.

Bytes are checked by digests (a point, a VM's disks through a stopped disk
access) or by the lab guest's journal on the disk (``journal_of``). One lab
guest boot carries the lifecycle (on a point, quiesce, thaw, clean stop,
then a forced stop of a frozen guest); a VM without an OS (SeaBIOS finds
nothing to boot, nobody handles ACPI) is the guest that ignores shutdown.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.domain.errors import (
    GuestError,
    HostNotFound,
    SwitchMissing,
    VmInconsistent,
    VmNotFound,
)
from siterecovery.domain.model import DiskDef, OsType, Site, SiteRole, Vm, VmPower
from siterecovery.providers.base import HYPERVISOR_METHODS, Hypervisor
from siterecovery.providers.hosts import HostBook, HostEntry, HostRouter
from siterecovery.providers.libvirt.guest_image import GuestImage, detect_accel
from siterecovery.providers.local.provider import LocalHypervisor
from siterecovery.providers.local.replicas import LocalReplicaStore

from .libvirtd import LibvirtHost
from .support import connect, ensure_lab_network, journal_of, wait_until

pytest.importorskip("libvirt")

from siterecovery.providers.libvirt.hypervisor import LibvirtHypervisor

MiB = 2**20
SIZE = 8 * MiB
GUEST_SIZE = 64 * MiB  # room for the lab guest's journal
BOOT_TIMEOUT = 240.0


class Lab:
    """The hypervisor under test, its site on ``host`` and a replica store."""

    def __init__(self, host: LibvirtHost, site: Site, hypervisor: LibvirtHypervisor) -> None:
        self.host = host
        self.site = site
        self.vms: Hypervisor = hypervisor
        self.hypervisor = hypervisor
        self.replicas = LocalReplicaStore()

    def digests(self, vm: Vm) -> dict[str, str]:
        with self.vms.disk_access(self.site, vm) as access:
            assert not access.running
            found = {}
            for disk in vm.disks:
                with access.open(disk.name) as device:
                    found[disk.name] = disk_digest(device)
            return found

    def point_digest(self, item: str, point: str) -> str:
        with self.replicas.open_point(self.site, item, "d0", point) as device:
            return disk_digest(device)

    def domain(self, vm: Vm) -> Any:
        return self.hypervisor._domain(self.site, vm)


@pytest.fixture(scope="module")
def lab(
    libvirt_host: LibvirtHost, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Lab]:
    site_dir = tmp_path_factory.mktemp("lvsite")
    site = Site(name="kvm", provider="libvirt", path=str(site_dir), role=SiteRole.CLOUD)
    with connect(libvirt_host) as conn:
        ensure_lab_network(conn)
    virt_type = "kvm" if detect_accel(guest_image) == "kvm" else "qemu"
    hypervisor = LibvirtHypervisor(
        lambda host: libvirt_host.uri, virt_type=virt_type, guest_image=lambda: guest_image
    )
    yield Lab(libvirt_host, site, hypervisor)
    hypervisor.close()


def _vm(name: str, *, disks: int = 1, workload: bool = False, size: int = SIZE,
        nics: tuple[str, ...] = ("sr-lab",)) -> Vm:  # fmt: skip
    return Vm(
        name=name, site="kvm", host="east", os=OsType.LINUX, nics=nics,
        disks=tuple(DiskDef(f"d{i}", size) for i in range(disks)), cpus=1, memory_mib=256,
        workload=workload,
    )  # fmt: skip


def _seq(agent: Any) -> int:
    """The guest's last acknowledged seq; -1 until its workload answers."""
    try:
        return int(agent.status().get("seq", -1))
    except GuestError:
        return -1


def _checkpoints(lab: Lab, vm: Vm) -> list[tuple[str, bool]]:
    """The running VM's checkpoints as its (libvirt) disk access reports them."""
    with lab.vms.disk_access(lab.site, vm) as access:
        assert access.running
        return [(b.name, b.inconsistent) for b in access.trackers()["d0"].bitmaps()]


def _reference(tmp_path: Path, writes: list[tuple[int, bytes]], size: int = SIZE) -> str:
    path = tmp_path / f"ref-{len(list(tmp_path.glob('ref-*')))}.raw"
    create_raw(path, size)
    with FileDevice.open(path, writable=True) as device:
        for offset, data in writes:
            device.write(offset, memoryview(data))
        return disk_digest(device)


def _write_point(lab: Lab, item: str, size: int, writes: list[tuple[int, bytes]]) -> str:
    with lab.replicas.begin(lab.site, item, "d0", 1, size) as device:
        for offset, data in writes:
            device.write(offset, memoryview(data))
    return lab.replicas.seal(lab.site, item, "d0", 1)


# Without booting anything ------------------------------------------------------------


@pytest.mark.guest
def test_create_is_idempotent_and_a_new_vm_is_stopped_with_blank_disks(
    lab: Lab, tmp_path: Path
) -> None:
    vm = _vm("blank", disks=2)
    lab.vms.create_vm(lab.site, vm, checkpoint="cp0")
    lab.vms.create_vm(lab.site, vm, checkpoint="cp0")
    assert lab.vms.power(lab.site, vm) is VmPower.STOPPED
    assert lab.vms.guest(lab.site, vm) is None
    domain = lab.domain(vm)
    assert domain.state() == "shutoff" and domain.persistent()
    xml = domain.xml(inactive=True)
    assert "vda" in xml and "vdb" in xml and "network='sr-lab'" in xml
    assert domain.checkpoints() == ["sr-cp0"]  # Redefined from the qcow2 bitmaps.
    blank = _reference(tmp_path, [])
    assert lab.digests(vm) == {"d0": blank, "d1": blank}
    with lab.vms.disk_access(lab.site, vm) as access:
        for tracker in access.trackers().values():
            assert [(b.name, b.inconsistent) for b in tracker.bitmaps()] == [("cp0", False)]
    lab.vms.add_checkpoint(lab.site, vm, "cp1")
    lab.vms.add_checkpoint(lab.site, vm, "cp1")
    assert lab.domain(vm).checkpoints() == ["sr-cp0", "sr-cp1"]
    lab.vms.delete_vm(lab.site, vm)


@pytest.mark.guest
def test_bitmaps_a_stopped_access_changed_are_libvirt_checkpoints_again(lab: Lab) -> None:
    vm = _vm("offline")
    lab.vms.create_vm(lab.site, vm, checkpoint="cp0")
    with lab.vms.disk_access(lab.site, vm) as access:
        _write(access, 0, MiB)  # cp0 records
        tracker = access.trackers()["d0"]
        for view in access.freeze([(tracker, ["cp0"])], "t-cp1", new_checkpoint="cp1"):
            view.release()  # qemu-storage-daemon: cp1 records, cp0 stops
        _write(access, 4 * MiB, MiB)  # cp1 only
    # libvirt's meaning: every checkpoint records all writes since it began.
    image = lab.vms.disk_image(lab.site, vm, "d0")
    assert [(b.name, b.enabled) for b in qemu_img.bitmaps(image)] == [
        ("sr-cp0", True), ("sr-cp1", True)]  # fmt: skip
    assert lab.domain(vm).checkpoints() == ["sr-cp0", "sr-cp1"]
    with lab.vms.disk_access(lab.site, vm) as access:
        counts = {b.name: b.count for b in access.trackers()["d0"].bitmaps()}
    assert counts == {"cp0": 2 * MiB, "cp1": MiB}
    lab.vms.replace_disks(lab.site, vm)  # Blank disks: no checkpoint left.
    assert lab.domain(vm).checkpoints() == []
    lab.vms.delete_vm(lab.site, vm)


def _write(access: Any, offset: int, length: int) -> None:
    with access.open("d0", writable=True) as device:
        device.write(offset, memoryview(os.urandom(length)))
        device.flush()


@pytest.mark.guest
def test_a_switch_the_host_lacks_is_refused_and_nothing_is_defined(lab: Lab) -> None:
    vm = _vm("nonet", nics=("sr-lab", "no-such-switch"))
    with pytest.raises(SwitchMissing) as refused:
        lab.vms.create_vm(lab.site, vm)
    assert "no-such-switch" in refused.value.message
    with pytest.raises(VmNotFound):
        lab.domain(vm)
    assert not (Path(lab.site.path) / "vms" / "nonet" / "disks").exists()


@pytest.mark.guest
def test_an_inconsistent_vm_refuses_to_start(lab: Lab) -> None:
    vm = _vm("marked")
    lab.vms.create_vm(lab.site, vm)
    lab.vms.set_inconsistent(lab.site, vm, True)
    assert lab.vms.is_inconsistent(lab.site, vm)
    assert lab.vms.power(lab.site, vm) is VmPower.INCONSISTENT
    with pytest.raises(VmInconsistent):
        lab.vms.start_vm(lab.site, vm)
    assert lab.domain(vm).state() == "shutoff"
    lab.vms.set_inconsistent(lab.site, vm, False)
    assert lab.vms.power(lab.site, vm) is VmPower.STOPPED
    lab.vms.delete_vm(lab.site, vm)


@pytest.mark.guest
def test_delete_is_idempotent_and_removes_the_domain_and_its_files(lab: Lab) -> None:
    vm = _vm("gone")
    lab.vms.create_vm(lab.site, vm, checkpoint="cp1")
    vm_dir = Path(lab.site.path) / "vms" / "gone"
    assert lab.vms.disk_image(lab.site, vm, "d0").exists()
    lab.vms.delete_vm(lab.site, vm)
    lab.vms.delete_vm(lab.site, vm)
    with pytest.raises(VmNotFound):
        lab.domain(vm)
    assert not vm_dir.exists()
    # The domain already gone (undefined by hand), its files left: still deleted.
    lab.vms.create_vm(lab.site, vm)
    lab.host.virsh("undefine", "gone", "--checkpoints-metadata")
    lab.vms.delete_vm(lab.site, vm)
    assert not vm_dir.exists()
    assert lab.vms.power(lab.site, vm) is VmPower.STOPPED


# Booting -----------------------------------------------------------------------------


@pytest.mark.guest
def test_a_guest_that_ignores_shutdown_is_destroyed_within_the_timeout(
    lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    vm = _vm("deaf")  # No OS: SeaBIOS finds nothing to boot; nobody answers ACPI.
    lab.vms.create_vm(lab.site, vm, checkpoint="cp0")
    # The host lost its checkpoint metadata: the start redefines it from the bitmaps.
    lab.host.virsh("checkpoint-delete", "deaf", "sr-cp0", "--metadata")
    assert lab.domain(vm).checkpoints() == []
    lab.vms.start_vm(lab.site, vm)
    lab.vms.start_vm(lab.site, vm)  # idempotent
    assert lab.vms.power(lab.site, vm) is VmPower.RUNNING
    assert lab.vms.guest(lab.site, vm) is None  # No agent: crash-consistent points.
    assert lab.domain(vm).checkpoints() == ["sr-cp0"]
    assert _checkpoints(lab, vm) == [("cp0", False)]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="siterecovery.providers.libvirt.hypervisor"):
        lab.vms.stop_vm(lab.site, vm, timeout=4.0)
    took = time.monotonic() - started
    assert lab.vms.power(lab.site, vm) is VmPower.STOPPED
    assert any("forced stop" in r.getMessage() for r in caplog.records)
    assert lab.vms.guest_state(lab.site, vm)["stop"] == "forced"
    lab.vms.stop_vm(lab.site, vm)  # idempotent
    lab.vms.delete_vm(lab.site, vm)
    print(f"\nforced stop after a 4 s timeout: {took:.1f} s")


@pytest.mark.guest
def test_the_lab_guest_on_a_point_quiesces_thaws_and_stops(
    lab: Lab, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    written = [(0, os.urandom(MiB)), (40 * MiB, os.urandom(64 << 10))]
    point = _write_point(lab, "app-item", GUEST_SIZE, written)
    base = lab.replicas.point_image(lab.site, "app-item", "d0", point)
    point_digest = lab.point_digest("app-item", point)
    vm = _vm("app", workload=True, size=GUEST_SIZE)
    lab.vms.create_vm(lab.site, vm, bases={"d0": base}, checkpoint="fo1")
    lab.vms.create_vm(lab.site, vm, bases={"d0": base}, checkpoint="fo1")
    assert lab.digests(vm) == {"d0": _reference(tmp_path, written, GUEST_SIZE)}
    assert lab.vms.reads_through(lab.site, vm) == {base}

    started = time.monotonic()
    lab.vms.start_vm(lab.site, vm)
    agent = wait_until(lambda: lab.vms.guest(lab.site, vm), "the guest agent", BOOT_TIMEOUT)
    wait_until(lambda: _seq(agent) >= 5, "records", BOOT_TIMEOUT)
    booted = time.monotonic() - started
    assert lab.vms.power(lab.site, vm) is VmPower.RUNNING
    assert _checkpoints(lab, vm) == [("fo1", False)]  # libvirt's, redefined at the start

    seq = agent.quiesce(timeout=60.0)
    try:
        time.sleep(1.0)
        status = agent.status()
        assert status["paused"] and status["fsfreeze"] == "frozen"
        assert int(status["seq"]) == seq  # held still
    finally:
        agent.thaw()
    agent.thaw()  # idempotent
    wait_until(lambda: agent.status()["seq"] >= seq + 5, "writes after the thaw", 60.0)
    last_seen = int(agent.status()["seq"])

    stopping = time.monotonic()
    lab.vms.stop_vm(lab.site, vm, timeout=90.0)
    stopped = time.monotonic() - stopping
    assert lab.vms.power(lab.site, vm) is VmPower.STOPPED
    assert lab.vms.guest(lab.site, vm) is None
    state = lab.vms.guest_state(lab.site, vm)
    assert state["stop"] == "clean" and int(str(state["seq"])) >= last_seen
    report = journal_of(lab.vms.disk_image(lab.site, vm, "d0"), tmp_path)
    assert report.consistent, report.errors
    assert report.last_seq >= int(str(state["seq"])) >= last_seen
    assert lab.point_digest("app-item", point) == point_digest  # The point is intact.
    with lab.vms.disk_access(lab.site, vm) as access:
        (bitmap,) = [b for b in access.trackers()["d0"].bitmaps() if b.name == "fo1"]
        assert not bitmap.inconsistent and bitmap.count > 0  # Tracked from the first write.
    assert lab.domain(vm).checkpoints() == ["sr-fo1"]
    # A stopped access (qemu-storage-daemon) starts checkpoint p2 and stops fo1;
    # libvirt's metadata follows, and fo1 records again (libvirt's meaning).
    with lab.vms.disk_access(lab.site, vm) as access:
        tracker = access.trackers()["d0"]
        for view in access.freeze([(tracker, ["fo1"])], "t-p2", new_checkpoint="p2"):
            view.release()
    assert lab.domain(vm).checkpoints() == ["sr-fo1", "sr-p2"]

    # A frozen guest refuses the agent's shutdown and ignores ACPI: destroyed.
    lab.vms.start_vm(lab.site, vm)
    agent = wait_until(lambda: lab.vms.guest(lab.site, vm), "the guest agent", BOOT_TIMEOUT)
    wait_until(lambda: _seq(agent) > report.last_seq, "records", BOOT_TIMEOUT)
    assert _checkpoints(lab, vm) == [("fo1", False), ("p2", False)]
    frozen_at = agent.quiesce(timeout=60.0)
    forcing = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="siterecovery.providers.libvirt.hypervisor"):
        lab.vms.stop_vm(lab.site, vm, timeout=6.0)
    forced = time.monotonic() - forcing
    assert any("forced stop" in r.getMessage() for r in caplog.records)
    state = lab.vms.guest_state(lab.site, vm)
    assert state["stop"] == "forced" and int(str(state["seq"])) == frozen_at
    report = journal_of(lab.vms.disk_image(lab.site, vm, "d0"), tmp_path)
    assert report.consistent and report.last_seq >= frozen_at, report.errors
    image = lab.vms.disk_image(lab.site, vm, "d0")
    assert [(b.name, b.enabled) for b in qemu_img.bitmaps(image)] == [
        ("sr-fo1", True), ("sr-p2", True)]  # fmt: skip
    with lab.vms.disk_access(lab.site, vm) as access:
        after = access.trackers()["d0"].bitmaps()
    print(
        f"\nboot to 5 records {booted:.1f} s, clean stop {stopped:.1f} s, "
        f"forced stop (6 s timeout) {forced:.1f} s, fo1 after it: {after}"
    )
    lab.vms.delete_vm(lab.site, vm)
    assert lab.point_digest("app-item", point) == point_digest


# The provider --------------------------------------------------------------------------


def test_a_site_routes_each_vm_to_its_hosts_hypervisor(tmp_path: Path) -> None:
    """A site's VMs run on their host's hypervisor: a kvm host in the site's
    hosts.json goes to libvirt (made once, at the first call), any other host
    to the provider's own; the router offers every method of the protocol."""
    site = Site(name="mixed", provider="local", path=str(tmp_path / "s"), role=SiteRole.CLOUD)
    book = HostBook(site.path)
    book.put(HostEntry("east", "kvm", "qemu+ssh://root@east/system"))
    book.put(HostEntry("east", "kvm", "qemu+ssh://root@east2/system"))  # replaced, not added
    made: list[LibvirtHypervisor] = []

    def libvirt() -> LibvirtHypervisor:
        made.append(LibvirtHypervisor())
        return made[-1]

    local = LocalHypervisor()
    router = HostRouter(local, libvirt=libvirt)
    assert all(callable(getattr(router, m, None)) for m in HYPERVISOR_METHODS)
    on_kvm, on_local = replace(_vm("r1"), host="east"), replace(_vm("r2"), host="hv01")
    assert router.of(site, on_local) is local
    assert router.of(site, on_kvm) is router.of(site, on_kvm) is made[0] and len(made) == 1
    assert made[0]._uri(site, "east") == "qemu+ssh://root@east2/system"
    with pytest.raises(HostNotFound):
        made[0]._uri(site, "west")


class FakeDomain:
    """What LibvirtGuestAgent asks of a domain, for a plain qemu-guest-agent
    (no ``sr-status``) that freezes, or that never answers the freeze."""

    name, uri = "plain", "test:///fake"

    def __init__(self, *, hangs: bool = False) -> None:
        self.hangs = hangs
        self.frozen = False
        self.timeouts: list[int] = []
        self.raw = self

    def agentSetResponseTimeout(self, seconds: int, flags: int) -> int:
        self.timeouts.append(seconds)
        return 0

    def fs_freeze(self) -> int:
        if self.hangs:
            raise GuestError(detail="Guest agent is not responding: timeout")
        self.frozen = True
        return 1

    def fs_thaw(self) -> int:
        was, self.frozen = self.frozen, False
        return int(was)

    def state(self) -> str:
        return "running"

    def agent_command(self, command: str, timeout: int = 10) -> Any:
        assert command == "guest-fsfreeze-status"
        return "frozen" if self.frozen else "thawed"


def test_a_guest_without_sr_status_quiesces_with_no_seq(tmp_path: Path) -> None:
    from siterecovery.providers.libvirt.guest_agent import LibvirtGuestAgent

    domain: Any = FakeDomain()
    agent = LibvirtGuestAgent(lambda: domain, tmp_path / "guest.json", has_status=False)
    assert agent.quiesce(timeout=7.0) is None  # quiesced, no record seq claimed
    assert agent.status() == {"paused": True, "fsfreeze": "frozen"}
    agent.thaw()
    agent.thaw()
    assert agent.status() == {"paused": False, "fsfreeze": "thawed"}
    assert domain.timeouts == [7, -1]  # libvirt's default again after the freeze
    assert not (tmp_path / "guest.json").exists()  # Nothing to remember.
    hung: Any = FakeDomain(hangs=True)
    agent = LibvirtGuestAgent(lambda: hung, tmp_path / "guest.json", has_status=False)
    with pytest.raises(GuestError):
        agent.quiesce(timeout=1.0)
