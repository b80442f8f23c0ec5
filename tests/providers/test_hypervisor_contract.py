"""The Hypervisor contract, run against every implementation.

Every hypervisor (``params`` of the ``any_lab`` fixture: the local one —
qemu-storage-daemon VMs — and libvirt, marker ``guest``; the ``lab``
fixture's tests write into a running VM's disks from outside, which only the
local one allows) must pass the same tests, with
bytes checked by digests: a new VM's disks read as zeroes, or as exactly the
point they are based on (which the VM's writes never change); what a running
VM wrote is there after a clean stop; a checkpoint tracks every write from
the first one and stays consistent across a clean stop, never after a crash;
a VM marked inconsistent refuses to start; replaced disks are blank; a VM's
disks can be handed to the replica store (adopt) and read there as they were;
delete is idempotent; the guest agent quiesces and reports its last record.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.disk.qsd import StorageDaemon
from siterecovery.domain.errors import GuestError, VmInconsistent
from siterecovery.domain.model import DiskDef, OsType, Site, SiteRole, Vm, VmPower
from siterecovery.providers.base import GuestAgent, Hypervisor
from siterecovery.providers.local.provider import LocalHypervisor, LocalProvider
from siterecovery.providers.replicas import ReplicaStore

MiB = 1 << 20
SIZE = 8 * MiB
BOOT_TIMEOUT = 180.0
"""Seconds a guest may take to answer its agent after start (a loaded host)."""


class Lab:
    """One implementation under test: its hypervisor, replica store and site."""

    def __init__(self, vms: Hypervisor, replicas: ReplicaStore, site: Site) -> None:
        self.vms = vms
        self.replicas = replicas
        self.site = site

    def digests(self, vm: Vm) -> dict[str, str]:
        with self.vms.disk_access(self.site, vm) as access:
            found = {}
            for disk in vm.disks:
                with access.open(disk.name) as device:
                    found[disk.name] = disk_digest(device)
            return found

    def write(self, vm: Vm, disk: str, offset: int, data: bytes) -> None:
        with (
            self.vms.disk_access(self.site, vm) as access,
            access.open(disk, writable=True) as device,
        ):
            device.write(offset, memoryview(data))
            device.flush()

    def crash(self, vm: Vm) -> None:
        """What a host crash does to the running VM: its disk server is SIGKILLed."""
        assert isinstance(self.vms, LocalHypervisor)
        daemon = StorageDaemon.attach(self.vms._vm_run(self.site, vm))
        assert daemon is not None
        os.kill(daemon.pid, signal.SIGKILL)
        _wait_gone(daemon.pid)


@pytest.fixture(scope="module")
def kvm_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private libvirtd with a network ``lan`` (tests/libvirt/libvirtd.py)."""
    from tests.libvirt.libvirtd import running_hosts, skip_unless_libvirt
    from tests.libvirt.support import connect

    skip_unless_libvirt()
    with running_hosts(tmp_path_factory.mktemp("lvc"), ["contract"]) as (host,):
        with connect(host) as conn:
            conn.define_network("<network><name>lan</name><bridge name='srlan0'/></network>")
        yield host.uri


def _lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    site = Site(name="hv", provider="local", path=str(tmp_path / "site"), role=SiteRole.CLOUD)
    provider = LocalProvider()
    provider.prepare_site(site)
    vms: Hypervisor = provider.hypervisor
    if request.param == "libvirt":
        # hv01 is a kvm host of the site: the router sends its VMs to libvirt.
        from siterecovery.providers.hosts import HostBook, HostEntry, HostRouter
        from siterecovery.providers.libvirt.guest_image import build_guest, detect_accel
        from siterecovery.providers.libvirt.hypervisor import LibvirtHypervisor

        HostBook(site.path).put(HostEntry("hv01", "kvm", request.getfixturevalue("kvm_uri")))
        virt = "kvm" if detect_accel(build_guest()) == "kvm" else "qemu"
        vms = HostRouter(provider.hypervisor, libvirt=lambda: LibvirtHypervisor(virt_type=virt))
    made = Lab(vms, provider.replicas, site)
    yield made
    for vm_dir in (tmp_path / "site" / "vms").glob("*"):
        made.vms.delete_vm(site, _vm(vm_dir.name))


@pytest.fixture(params=["local"])
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    """The implementations whose running VMs' disks a test may write into from
    outside (libvirt's are the guest's own: tests/libvirt/test_libvirt_hypervisor.py
    proves the same with the guest's writes)."""
    yield from _lab(request, tmp_path)


@pytest.fixture(params=["local", pytest.param("libvirt", marks=pytest.mark.guest)])
def any_lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    """Every implementation (libvirt: a private libvirtd, the lab guest under TCG)."""
    yield from _lab(request, tmp_path)


def _vm(name: str, *, disks: int = 1, workload: bool = False, size: int = SIZE) -> Vm:
    return Vm(
        name=name, site="hv", host="hv01", os=OsType.LINUX,
        disks=tuple(DiskDef(f"d{i}", size) for i in range(disks)), nics=("lan",),
        workload=workload,
    )  # fmt: skip


def _reference(tmp_path: Path, writes: list[tuple[int, bytes]], name: str = "ref") -> str:
    path = tmp_path / f"{name}.raw"
    create_raw(path, SIZE)
    with FileDevice.open(path, writable=True) as device:
        for offset, data in writes:
            device.write(offset, memoryview(data))
        return disk_digest(device)


def test_a_new_vm_is_stopped_with_blank_disks_and_create_is_idempotent(
    any_lab: Lab, tmp_path: Path
) -> None:
    vm = _vm("a", disks=2)
    any_lab.vms.create_vm(any_lab.site, vm)
    any_lab.vms.create_vm(any_lab.site, vm)
    assert any_lab.vms.power(any_lab.site, vm) is VmPower.STOPPED
    blank = _reference(tmp_path, [])
    assert any_lab.digests(vm) == {"d0": blank, "d1": blank}


def test_what_a_running_vm_wrote_is_there_after_a_clean_stop(lab: Lab, tmp_path: Path) -> None:
    vm = _vm("b")
    lab.vms.create_vm(lab.site, vm)
    lab.vms.start_vm(lab.site, vm)
    lab.vms.start_vm(lab.site, vm)  # idempotent
    assert lab.vms.power(lab.site, vm) is VmPower.RUNNING
    with lab.vms.disk_access(lab.site, vm) as access:
        assert access.running
    data = os.urandom(MiB)
    lab.write(vm, "d0", 3 * MiB, data)
    lab.vms.stop_vm(lab.site, vm)
    lab.vms.stop_vm(lab.site, vm)  # idempotent
    assert lab.vms.power(lab.site, vm) is VmPower.STOPPED
    with lab.vms.disk_access(lab.site, vm) as access:
        assert not access.running
    assert lab.digests(vm) == {"d0": _reference(tmp_path, [(3 * MiB, data)])}


def test_a_vm_on_a_point_reads_the_point_and_never_changes_it(lab: Lab, tmp_path: Path) -> None:
    written = [(0, os.urandom(MiB)), (6 * MiB, os.urandom(64 << 10))]
    with lab.replicas.begin(lab.site, "item", "d0", 1, SIZE) as device:
        for offset, data in written:
            device.write(offset, memoryview(data))
    point = lab.replicas.seal(lab.site, "item", "d0", 1)
    vm = _vm("c")
    base = lab.replicas.point_image(lab.site, "item", "d0", point)
    lab.vms.create_vm(lab.site, vm, bases={"d0": base}, checkpoint="fo1")
    assert lab.digests(vm) == {"d0": _reference(tmp_path, written)}
    lab.vms.start_vm(lab.site, vm)
    more = (2 * MiB, os.urandom(MiB))
    lab.write(vm, "d0", *more)
    lab.vms.stop_vm(lab.site, vm)
    assert lab.digests(vm) == {"d0": _reference(tmp_path, [*written, more], "after")}
    with lab.replicas.open_point(lab.site, "item", "d0", point) as device:
        assert disk_digest(device) == _reference(tmp_path, written)  # the point is intact
    # Its writes were tracked from the first one, by the failover's checkpoint.
    with lab.vms.disk_access(lab.site, vm) as access:
        tracker = access.trackers()["d0"]
        (bitmap,) = [b for b in tracker.bitmaps() if b.name == "fo1"]
        assert not bitmap.inconsistent and MiB <= bitmap.count <= 2 * MiB
    assert lab.vms.reads_through(lab.site, vm) == {base}


def test_a_checkpoint_is_consistent_after_a_clean_stop_never_after_a_crash(lab: Lab) -> None:
    vm = _vm("d")
    lab.vms.create_vm(lab.site, vm)
    lab.vms.add_checkpoint(lab.site, vm, "cp1")
    lab.vms.start_vm(lab.site, vm)
    lab.write(vm, "d0", 0, os.urandom(256 << 10))
    lab.vms.stop_vm(lab.site, vm)
    lab.vms.start_vm(lab.site, vm)
    with lab.vms.disk_access(lab.site, vm) as access:
        tracker = access.trackers()["d0"]
        (clean,) = [b for b in tracker.bitmaps() if b.name == "cp1"]
        assert not clean.inconsistent and clean.count >= 256 << 10
    lab.write(vm, "d0", MiB, os.urandom(64 << 10))
    lab.crash(vm)
    lab.vms.start_vm(lab.site, vm)
    with lab.vms.disk_access(lab.site, vm) as access:
        tracker = access.trackers()["d0"]
        crashed = [b for b in tracker.bitmaps() if b.name == "cp1"]
        # Lost, or flagged: a crash never leaves a bitmap that looks trustworthy.
        assert not crashed or crashed[0].inconsistent


def test_an_inconsistent_vm_refuses_to_start_and_replaced_disks_are_blank(
    any_lab: Lab, tmp_path: Path
) -> None:
    vm = _vm("e")
    any_lab.vms.create_vm(any_lab.site, vm)
    any_lab.write(vm, "d0", 0, os.urandom(MiB))
    any_lab.vms.set_inconsistent(any_lab.site, vm, True)
    assert any_lab.vms.is_inconsistent(any_lab.site, vm)
    assert any_lab.vms.power(any_lab.site, vm) is VmPower.INCONSISTENT
    with pytest.raises(VmInconsistent):
        any_lab.vms.start_vm(any_lab.site, vm)
    any_lab.vms.replace_disks(any_lab.site, vm)
    assert any_lab.digests(vm) == {"d0": _reference(tmp_path, [])}
    any_lab.vms.set_inconsistent(any_lab.site, vm, False)
    any_lab.vms.start_vm(any_lab.site, vm)
    assert any_lab.vms.power(any_lab.site, vm) is VmPower.RUNNING


def test_adopted_disks_become_a_point_and_delete_is_idempotent(
    any_lab: Lab, tmp_path: Path
) -> None:
    vm = _vm("f")
    any_lab.vms.create_vm(any_lab.site, vm)
    data = (4 * MiB, os.urandom(MiB))
    any_lab.write(vm, "d0", *data)
    image = any_lab.vms.disk_image(any_lab.site, vm, "d0")
    any_lab.vms.stop_vm(any_lab.site, vm)
    name = any_lab.replicas.adopt(any_lab.site, "f", "d0", 5, image)
    assert any_lab.replicas.adopt(any_lab.site, "f", "d0", 5, image) == name  # idempotent
    any_lab.vms.delete_vm(any_lab.site, vm)
    any_lab.vms.delete_vm(any_lab.site, vm)
    assert any_lab.replicas.chain(any_lab.site, "f", "d0") == [name]
    with any_lab.replicas.open_point(any_lab.site, "f", "d0", name) as device:
        assert disk_digest(device) == _reference(tmp_path, [data])


def test_the_guest_agent_quiesces_and_reports_its_last_record(any_lab: Lab) -> None:
    vm = _vm("g", workload=True, size=64 * MiB)  # room for the guest's journal
    any_lab.vms.create_vm(any_lab.site, vm)
    assert any_lab.vms.guest(any_lab.site, vm) is None  # stopped: no guest to talk to
    any_lab.vms.start_vm(any_lab.site, vm)
    # A real guest answers once it has booted (TCG: tens of seconds); until
    # then it has no agent to talk to.
    guest = _booted(any_lab, vm)
    seq = guest.quiesce(timeout=60.0)
    try:
        time.sleep(0.3)
        status = guest.status()
        assert status["paused"] and int(status["seq"]) == seq  # held still
    finally:
        guest.thaw()
    guest.thaw()  # idempotent
    any_lab.vms.stop_vm(any_lab.site, vm)
    assert int(any_lab.vms.guest_state(any_lab.site, vm)["seq"]) >= seq


def _booted(lab: Lab, vm: Vm) -> GuestAgent:
    """The guest agent once the guest's workload answers (a real guest boots
    first: TCG takes tens of seconds; until then it has no agent, or one
    whose workload is not up yet)."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    while True:
        guest = lab.vms.guest(lab.site, vm)
        if guest is not None:
            with contextlib.suppress(GuestError):
                if int(guest.status().get("seq", 0)) >= 1:
                    return guest
        assert time.monotonic() < deadline, "the guest's workload did not answer"
        time.sleep(0.5)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
