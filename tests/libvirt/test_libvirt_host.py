"""The libvirt building blocks against real, private libvirtd "hosts".

Two daemons run side by side (``libvirtd.py``: a mount and a network namespace
each); the tests define domains on them as a user would (``virsh define`` of
hand-written XML) and with our generator, discover them, and boot the lab
guest through libvirt under TCG: guest agent, freeze and thaw, checkpoints,
a pull-mode incremental backup read over NBD, shutdown through the agent and
a consistent journal on the disk afterwards.

The XML tests at the top need no daemon (nor libvirt-python).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.model import VmPower
from siterecovery.providers.libvirt.domains import (
    DirectBoot,
    DiskSpec,
    DomainSpec,
    NicSpec,
    checkpoint_xml,
    domain_xml,
    list_domains,
    parse_domain,
    power_of,
    switches,
)
from siterecovery.providers.libvirt.guest_image import GuestImage

from .libvirtd import LibvirtHost, mounts_of
from .support import boot_lab_guest, connect, journal_of, shut_down, wait_until, workload_status

MiB = 2**20

# The XML, without a daemon ---------------------------------------------------------

SPECS = [
    DomainSpec(name="minimal"),
    DomainSpec(
        name="web01",
        uuid="6f3b5a52-0c55-4f0e-9a55-3a4f51b0c0de",
        vcpus=4,
        memory=3 * 2**30,
        disks=(
            DiskSpec("vda", Path("/srv/images/web01-os.qcow2"), "virtio", "qcow2"),
            DiskSpec("sdb", Path("/dev/mapper/vg-data"), "scsi", "raw"),
            DiskSpec("sdc", Path("/srv/images/web01 logs.img"), "sata", "raw"),
        ),
        nics=(
            NicSpec("52:54:00:12:34:56", "prod-lan", "virtio", "network"),
            NicSpec("52:54:00:12:34:57", "br-dmz", "e1000", "bridge"),
        ),
        guest_agent=True,
        machine="pc-q35-7.2",
        virt_type="kvm",
    ),
    DomainSpec(
        name="odd <&'\"> name",
        virt_type="qemu",
        machine="q35",
        disks=(DiskSpec("vda", Path("/tmp/a&b<c>.qcow2")),),
        boot=DirectBoot(Path("/boot/vmlinuz"), Path("/boot/initrd.img"), 'console=ttyS0 a="b c"'),
        console_log=Path("/tmp/console & log.txt"),
    ),
    DomainSpec(name="kernel-only", boot=DirectBoot(Path("/k"), None, "")),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.name)
def test_a_spec_survives_its_xml(spec: DomainSpec) -> None:
    assert parse_domain(domain_xml(spec)) == spec


def test_user_data_is_escaped_not_formatted_into_markup() -> None:
    xml = domain_xml(SPECS[2])
    assert "odd &lt;&amp;'\"&gt; name" in xml
    assert "<name>odd" in xml and xml.count("<name>") == 1


def test_a_sparse_hand_written_domain_is_read_with_defaults() -> None:
    spec = parse_domain(
        """<domain type='kvm'><name> tiny </name><memory>524288</memory>
        <devices><disk type='network' device='disk'><target dev='vda'/></disk>
        <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sda'/></disk>
        <interface type='user'/><video><model type='vga'/></video><channel type='pty'/>
        </devices><unknown><element/></unknown></domain>"""
    )
    assert spec.name == "tiny"
    assert spec.memory == 512 * MiB  # KiB by default
    assert spec.vcpus == 1 and spec.uuid is None and spec.boot is None
    assert spec.disks == (DiskSpec("vda", None, "virtio", "raw"),)  # The cdrom is no disk.
    assert spec.nics == (NicSpec(None, None, None, "user"),)
    assert spec.guest_agent is False


@pytest.mark.parametrize(
    ("memory", "expected"),
    [("<memory unit='MiB'>192</memory>", 192 * MiB), ("<memory unit='GB'>2</memory>", 2 * 10**9),
     ("<memory unit='bytes'>4096</memory>", 4096), ("", 0)],
)  # fmt: skip
def test_memory_units_become_bytes(memory: str, expected: int) -> None:
    assert parse_domain(f"<domain><name>m</name>{memory}</domain>").memory == expected


@pytest.mark.parametrize(
    "xml", ["<network><name>n</name></network>", "<domain/>", "<domain",
            "<domain><name>m</name><memory unit='parsec'>1</memory></domain>"],
)  # fmt: skip
def test_what_is_not_a_domain_is_refused(xml: str) -> None:
    with pytest.raises(InvalidInput):
        parse_domain(xml)


def test_libvirt_states_map_to_power() -> None:
    assert power_of("running") is VmPower.RUNNING
    assert power_of("paused") is VmPower.RUNNING  # qemu still holds the disks
    assert power_of("shutoff") is VmPower.STOPPED
    assert power_of("crashed") is VmPower.STOPPED


# Private daemons -------------------------------------------------------------------


def test_two_private_daemons_answer(two_libvirt_hosts: list[LibvirtHost]) -> None:
    for host in two_libvirt_hosts:
        started = time.monotonic()
        with connect(host) as conn:
            opened = time.monotonic() - started
            assert "<capabilities>" in conn.capabilities()
            assert conn.hostname()
        assert mounts_of(host.dir) == []
        assert Path("/run/libvirt").stat().st_ino != (host.dir / "run").stat().st_ino
        print(
            f"\n{host.name}: libvirtd answered {host.start_seconds:.2f} s after spawn, "
            f"first capabilities {host.capabilities_seconds:.2f} s, connect {opened * 1000:.0f} ms"
        )


def test_an_unreachable_host_is_a_hypervisor_error(tmp_path: Path) -> None:
    pytest.importorskip("libvirt")
    from siterecovery.domain.errors import HypervisorError
    from siterecovery.providers.libvirt.connection import connect as open_connection

    uri = f"qemu+unix:///system?socket={tmp_path}/nobody-here"
    with pytest.raises(HypervisorError) as raised:
        open_connection(uri)
    assert raised.value.code == "HYPERVISOR_ERROR"
    assert uri in raised.value.message and "check that libvirtd runs" in raised.value.message
    assert raised.value.to_dict()["details"]["uri"] == uri


USER_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>0b9a3e7c-5a2d-4c86-8d7e-2f1e7f0a9c11</uuid>
  <description>defined by hand with virsh</description>
  <memory unit='MiB'>192</memory>
  <currentMemory unit='MiB'>192</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>
  <features><acpi/><apic/></features>
  <clock offset='utc'/>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{os_disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{data_disk}'/>
      <target dev='sdb' bus='sata'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sdc' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:01'/>
      <source network='{network}'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:aa:bb:02'/>
      <source bridge='br-legacy'/>
      <model type='e1000'/>
    </interface>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <graphics type='vnc' port='-1' autoport='yes'/>
    <video><model type='cirrus'/></video>
  </devices>
</domain>
"""


def test_a_domain_defined_with_virsh_is_discovered(
    two_libvirt_hosts: list[LibvirtHost], tmp_path: Path
) -> None:
    east, west = two_libvirt_hosts
    os_disk, data_disk = tmp_path / "crm01-os.qcow2", tmp_path / "crm01-data.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(os_disk), "32M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(data_disk), "16M"], check=True)
    (tmp_path / "net.xml").write_text(
        "<network><name>crm-lan</name><bridge name='srcrm0' stp='off'/></network>"
    )
    east.virsh("net-define", str(tmp_path / "net.xml"))
    (tmp_path / "crm01.xml").write_text(
        USER_XML.format(name="crm01", os_disk=os_disk, data_disk=data_disk, network="crm-lan")
    )
    east.virsh("define", str(tmp_path / "crm01.xml"))
    with connect(east) as conn:
        found = {d.spec.name: d for d in list_domains(conn)}
        assert {"crm-lan", "srcrm0", "default"} <= switches(conn)
    crm = found["crm01"]
    assert (crm.state, crm.power, crm.persistent) == ("shutoff", VmPower.STOPPED, True)
    spec = crm.spec
    assert spec.uuid == "0b9a3e7c-5a2d-4c86-8d7e-2f1e7f0a9c11"
    assert (spec.vcpus, spec.memory, spec.virt_type, spec.arch) == (2, 192 * MiB, "qemu", "x86_64")
    assert spec.machine is not None and "pc" in spec.machine  # libvirt filled in its default
    assert spec.disks == (
        DiskSpec("vda", os_disk, "virtio", "qcow2", 32 * MiB),
        DiskSpec("sdb", data_disk, "sata", "raw", 16 * MiB),
    )
    assert spec.nics == (
        NicSpec("52:54:00:aa:bb:01", "crm-lan", "virtio", "network"),
        NicSpec("52:54:00:aa:bb:02", "br-legacy", "e1000", "bridge"),
    )
    assert spec.guest_agent is True
    with connect(west) as other:
        assert "crm01" not in {d.spec.name for d in list_domains(other)}
        assert "crm-lan" not in switches(other)
        from siterecovery.domain.errors import VmNotFound

        with pytest.raises(VmNotFound):
            other.domain("crm01")


def test_a_generated_domain_is_defined_as_specified(
    libvirt_host: LibvirtHost, tmp_path: Path
) -> None:
    disk = tmp_path / "gen01.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    spec = DomainSpec(
        name="gen01", vcpus=2, memory=320 * MiB, virt_type="qemu", machine="q35",
        disks=(DiskSpec("vda", disk),), nics=(NicSpec("52:54:00:aa:cc:01", "default"),),
        guest_agent=True,
    )  # fmt: skip
    with connect(libvirt_host) as conn:
        domain = conn.define(domain_xml(spec))
        defined = parse_domain(domain.xml(inactive=True))
        domain.undefine()
    assert defined.uuid is not None and defined.machine is not None
    assert defined.machine.startswith("pc-q35-")  # libvirt expands the alias
    assert defined == replace(spec, uuid=defined.uuid, machine=defined.machine)


# The lab guest through libvirt (TCG) -----------------------------------------------


@pytest.mark.guest
def test_the_lab_guest_freezes_thaws_and_stops_through_libvirt(
    libvirt_host: LibvirtHost, conn: Any, guest_image: GuestImage, tmp_path: Path
) -> None:
    domain, to_agent = boot_lab_guest(conn, libvirt_host, guest_image, "lab01", seed=7)
    assert domain.xml().count("state='connected'") == 1  # libvirt sees the agent's port
    running = workload_status(domain)
    assert running is not None and running["paused"] is False and running["seed"] == 7
    started = time.monotonic()
    assert domain.raw.fsFreeze() == 1
    freeze = time.monotonic() - started
    frozen = domain.agent_command("sr-status")
    assert frozen["paused"] is True
    assert domain.agent_command("guest-fsfreeze-status") == "frozen"
    time.sleep(2.0)
    assert domain.agent_command("sr-status")["seq"] == frozen["seq"]
    started = time.monotonic()
    assert domain.fs_thaw() == 1
    thaw = time.monotonic() - started
    wait_until(
        lambda: domain.agent_command("sr-status")["seq"] > frozen["seq"] + 10, "writes", 30.0
    )
    assert domain.fs_thaw() == 0  # Nothing frozen: thaw is idempotent.
    last_seen = domain.agent_command("sr-status")["seq"]
    stopping = shut_down(domain)
    listed = {d.spec.name: d for d in list_domains(conn)}["lab01"]
    assert (listed.state, listed.power) == ("shutoff", VmPower.STOPPED)
    disk = listed.spec.disks[0].path
    assert disk is not None
    report = journal_of(disk, tmp_path)
    assert report.consistent, report.errors
    assert report.last_seq >= last_seen and report.seed == 7
    print(
        f"\ndefine -> guest-ping {to_agent:.1f} s, fsFreeze {freeze * 1000:.0f} ms, "
        f"fsThaw {thaw * 1000:.0f} ms, agent shutdown -> shutoff {stopping:.1f} s"
    )


@pytest.mark.guest
def test_checkpoints_and_an_incremental_pull_backup_over_nbd(
    libvirt_host: LibvirtHost, conn: Any, guest_image: GuestImage
) -> None:
    nbd = pytest.importorskip("nbd")
    domain, _ = boot_lab_guest(conn, libvirt_host, guest_image, "lab02", seed=9)
    assert domain.create_checkpoint(checkpoint_xml("sr-cp1", ["vda"])) == "sr-cp1"
    assert domain.checkpoints() == ["sr-cp1"]
    seq = domain.agent_command("sr-status")["seq"]
    wait_until(lambda: domain.agent_command("sr-status")["seq"] >= seq + 20, "writes", 30.0)
    socket = libvirt_host.dir / "run" / "lab02-backup.sock"
    scratch = libvirt_host.dir / "lib" / "images" / "lab02-scratch.qcow2"
    backup = (
        f"<domainbackup mode='pull'><incremental>sr-cp1</incremental>"
        f"<server transport='unix' socket='{socket}'/><disks>"
        f"<disk name='vda' backup='yes' type='file'><scratch file='{scratch}'/></disk>"
        f"</disks></domainbackup>"
    )  # Test-only XML: the paths are ours, under the host's directory.
    started = time.monotonic()
    domain.raw.backupBegin(backup, checkpoint_xml("sr-cp2", ["vda"]), 0)
    began = time.monotonic() - started
    try:
        assert domain.checkpoints() == ["sr-cp1", "sr-cp2"]
        dirty = dirty_extents(nbd, socket, "vda", "qemu:dirty-bitmap:backup-vda")
    finally:
        domain.raw.abortJob()
    assert dirty, "the guest wrote since sr-cp1"
    assert all(offset % 65536 == 0 for offset, _ in dirty)  # The bitmap's granularity.
    assert sum(length for _, length in dirty) < 64 * MiB  # Not the whole disk.
    shut_down(domain)
    print(f"\nbackupBegin {began * 1000:.0f} ms, {len(dirty)} dirty extents since sr-cp1")


def dirty_extents(nbd: Any, socket: Path, export: str, context: str) -> list[tuple[int, int]]:
    """``(offset, length)`` of the dirty extents of an NBD export's bitmap context."""
    handle = nbd.NBD()
    handle.add_meta_context(context)
    handle.set_export_name(export)
    handle.connect_unix(str(socket))
    try:
        assert handle.can_meta_context(context)
        size, offset, found = handle.get_size(), 0, []

        def collect(meta: str, start: int, entries: list[int], _error: Any) -> int:
            if meta == context:
                for length, flags in zip(entries[::2], entries[1::2], strict=True):
                    found.append((start, length, flags))
                    start += length
            return 0

        while offset < size:
            handle.block_status(min(size - offset, 2**30), offset, collect)
            offset = found[-1][0] + found[-1][1]
        data = [(start, length) for start, length, flags in found if flags & 1]
        if data:
            assert len(handle.pread(data[0][1], data[0][0])) == data[0][1]
        return data
    finally:
        handle.shutdown()
