"""libvirt domains as value objects: generate their XML, read any domain's XML.

:func:`domain_xml` writes the XML of a :class:`DomainSpec` (built with
``xml.etree.ElementTree``: names and paths are never formatted into markup);
:func:`parse_domain` reads the XML of any domain libvirt returns, including
one a user defined by hand: what the spec does not model (graphics, USB,
CPU model, cdroms, ...) is ignored, and missing optional parts are None.
:func:`list_domains` discovers a host's domains with their power state, and
:func:`switches` names the virtual switches (networks and their bridges) a
NIC can attach to.

Only ``device='disk'`` disks are disks here (cdroms and floppies are not
replicated). Memory is in bytes; libvirt's units (KiB by default, any of
``b``, ``k``/``KiB``, ``KB``, ``M``/``MiB``, ``MB``, ...) are converted.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.model import VmPower

if TYPE_CHECKING:
    from siterecovery.providers.libvirt.connection import Connection

GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"
"""The virtio-serial port name qemu-ga (and the lab guest's agent) listens on."""
ACTIVE_STATES = frozenset({"running", "blocked", "paused", "shutdown", "pmsuspended"})
"""libvirt states with a qemu process: :data:`VmPower.RUNNING`; the rest are STOPPED."""
_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 10**3, "k": 2**10, "kib": 2**10,
    "mb": 10**6, "m": 2**20, "mib": 2**20,
    "gb": 10**9, "g": 2**30, "gib": 2**30,
    "tb": 10**12, "t": 2**40, "tib": 2**40,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class DiskSpec:
    """One disk: ``target`` is the guest device name (``vda``, ``sda``).

    ``path`` is the image file, or a block device when under ``/dev`` (None for
    a network disk).
    ``size`` (bytes) is the image's virtual size; it is not part of the XML:
    :func:`parse_domain` leaves it None, :func:`list_domains` asks libvirt.
    """

    target: str
    path: Path | None
    bus: str = "virtio"
    format: str = "qcow2"
    size: int | None = None


@dataclass(frozen=True, slots=True)
class NicSpec:
    """One NIC on a virtual switch: ``kind`` is ``network`` (``switch`` names a
    libvirt network) or ``bridge`` (a host bridge); other kinds (``user``,
    ``direct``) are read with ``switch`` None."""

    mac: str | None
    switch: str | None
    model: str | None = "virtio"
    kind: str = "network"


@dataclass(frozen=True, slots=True)
class DirectBoot:
    """Boot a kernel and initramfs from host files instead of a bootloader."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """What siterecovery needs to know of a libvirt domain (``memory`` in bytes).

    ``virt_type`` is libvirt's domain type: ``kvm``, or ``qemu`` for TCG.
    ``console_log`` sends the first serial port to a file (None: no serial port
    is written; parsing reports it when the domain has a file serial port).
    """

    name: str
    vcpus: int = 1
    memory: int = 256 * 2**20
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    guest_agent: bool = False
    uuid: str | None = None
    boot: DirectBoot | None = None
    machine: str | None = None
    arch: str = "x86_64"
    virt_type: str = "kvm"
    console_log: Path | None = None


@dataclass(frozen=True, slots=True)
class DiscoveredDomain:
    """A domain found on a host: its spec (disk sizes filled in), libvirt's state
    name (``virsh domstate``), its power and whether it is persistent."""

    spec: DomainSpec
    state: str
    power: VmPower
    persistent: bool


def power_of(state: str) -> VmPower:
    """The project's power of a libvirt state name (a paused domain is RUNNING:
    its qemu holds the disks)."""
    return VmPower.RUNNING if state in ACTIVE_STATES else VmPower.STOPPED


# Writing ---------------------------------------------------------------------------


def domain_xml(spec: DomainSpec) -> str:
    """The libvirt XML of ``spec`` (a persistent definition for ``defineXML``)."""
    root = ET.Element("domain", type=spec.virt_type)
    _text(root, "name", spec.name)
    if spec.uuid is not None:
        _text(root, "uuid", spec.uuid)
    _text(root, "memory", str(spec.memory), unit="b")
    _text(root, "vcpu", str(spec.vcpus))
    root.append(_os(spec))
    ET.SubElement(ET.SubElement(root, "features"), "acpi")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart")):
        _text(root, event, action)
    _text(root, "on_crash", "destroy")
    devices = ET.SubElement(root, "devices")
    devices.extend(_disk(disk) for disk in spec.disks)
    devices.extend(_nic(nic) for nic in spec.nics)
    if spec.guest_agent:
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "target", type="virtio", name=GUEST_AGENT_CHANNEL)
    if spec.console_log is not None:
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=str(spec.console_log))
        ET.SubElement(serial, "target", port="0")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode")


def _text(parent: ET.Element, tag: str, text: str, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    element.text = text
    return element


def _os(spec: DomainSpec) -> ET.Element:
    element = ET.Element("os")
    kind = _text(element, "type", "hvm", arch=spec.arch)
    if spec.machine is not None:
        kind.set("machine", spec.machine)
    if spec.boot is None:
        ET.SubElement(element, "boot", dev="hd")
        return element
    _text(element, "kernel", str(spec.boot.kernel))
    if spec.boot.initrd is not None:
        _text(element, "initrd", str(spec.boot.initrd))
    _text(element, "cmdline", spec.boot.cmdline)
    return element


def _disk(disk: DiskSpec) -> ET.Element:
    is_block = disk.path is not None and disk.path.parts[:2] == ("/", "dev")
    element = ET.Element("disk", type="block" if is_block else "file", device="disk")
    ET.SubElement(element, "driver", name="qemu", type=disk.format)
    if disk.path is not None:
        ET.SubElement(element, "source", {"dev" if is_block else "file": str(disk.path)})
    ET.SubElement(element, "target", dev=disk.target, bus=disk.bus)
    return element


def _nic(nic: NicSpec) -> ET.Element:
    element = ET.Element("interface", type=nic.kind)
    if nic.mac is not None:
        ET.SubElement(element, "mac", address=nic.mac)
    if nic.switch is not None:
        ET.SubElement(element, "source", {nic.kind: nic.switch})
    if nic.model is not None:
        ET.SubElement(element, "model", type=nic.model)
    return element


def checkpoint_xml(name: str, targets: list[str]) -> str:
    """The XML of a checkpoint ``name`` tracking changes of the disks ``targets``."""
    root = ET.Element("domaincheckpoint")
    _text(root, "name", name)
    disks = ET.SubElement(root, "disks")
    for target in targets:
        ET.SubElement(disks, "disk", name=target, checkpoint="bitmap")
    return ET.tostring(root, encoding="unicode")


# Reading ---------------------------------------------------------------------------


def parse_domain(xml: str) -> DomainSpec:
    """The spec of any domain XML; InvalidInput when it is not a domain with a name."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as error:
        raise InvalidInput(field="domain XML", reason=str(error)) from None
    name = root.findtext("name")
    if root.tag != "domain" or not name:
        raise InvalidInput(field="domain XML", reason="not a <domain> with a <name>")
    devices = root.find("devices")
    found = [] if devices is None else list(devices)
    os_type = root.find("os/type")
    return DomainSpec(
        name=name.strip(),
        uuid=_stripped(root.findtext("uuid")),
        vcpus=int(root.findtext("vcpu") or "1"),
        memory=_memory(root.find("memory")),
        disks=tuple(_read_disk(d) for d in found if d.tag == "disk" and _is_disk(d)),
        nics=tuple(_read_nic(n) for n in found if n.tag == "interface"),
        guest_agent=any(_is_agent_channel(c) for c in found if c.tag == "channel"),
        boot=_read_boot(root.find("os")),
        machine=None if os_type is None else os_type.get("machine"),
        arch=(None if os_type is None else os_type.get("arch")) or "x86_64",
        virt_type=root.get("type", "kvm"),
        console_log=_console_log(found),
    )


def _stripped(text: str | None) -> str | None:
    return (text.strip() or None) if text is not None else None


def _memory(element: ET.Element | None) -> int:
    if element is None or not (element.text or "").strip():
        return 0
    unit = element.get("unit", "KiB").lower()
    if unit not in _UNITS:
        raise InvalidInput(field="domain XML", reason=f"unknown memory unit '{unit}'")
    return int(element.text or "0") * _UNITS[unit]


def _is_disk(element: ET.Element) -> bool:
    return element.get("device", "disk") == "disk"


def _read_disk(element: ET.Element) -> DiskSpec:
    source = element.find("source")
    path = None
    if source is not None and (where := source.get("file") or source.get("dev")):
        path = Path(where)
    target = element.find("target")
    driver = element.find("driver")
    return DiskSpec(
        target="" if target is None else target.get("dev", ""),
        path=path,
        bus=("" if target is None else target.get("bus", "")) or "virtio",
        format=("" if driver is None else driver.get("type", "")) or "raw",
    )


def _read_nic(element: ET.Element) -> NicSpec:
    kind = element.get("type", "network")
    mac, source, model = element.find("mac"), element.find("source"), element.find("model")
    return NicSpec(
        mac=None if mac is None else mac.get("address"),
        switch=None if source is None else source.get(kind),
        model=None if model is None else model.get("type"),
        kind=kind,
    )


def _is_agent_channel(element: ET.Element) -> bool:
    target = element.find("target")
    return target is not None and target.get("name") == GUEST_AGENT_CHANNEL


def _read_boot(element: ET.Element | None) -> DirectBoot | None:
    kernel = None if element is None else _stripped(element.findtext("kernel"))
    if element is None or kernel is None:
        return None
    initrd = _stripped(element.findtext("initrd"))
    return DirectBoot(
        kernel=Path(kernel),
        initrd=None if initrd is None else Path(initrd),
        cmdline=(element.findtext("cmdline") or "").strip(),
    )


def _console_log(devices: list[ET.Element]) -> Path | None:
    for serial in (d for d in devices if d.tag == "serial" and d.get("type") == "file"):
        source = serial.find("source")
        if source is not None and source.get("path"):
            return Path(source.get("path", ""))
    return None


# Discovery -------------------------------------------------------------------------


def list_domains(conn: Connection) -> list[DiscoveredDomain]:
    """Every domain of the host (persistent or running transient), sorted by
    name, with each disk's virtual size when libvirt can read it."""
    found = []
    for domain in conn.domains():
        spec = parse_domain(domain.xml())
        disks = tuple(replace(d, size=domain.disk_capacity(d.target)) for d in spec.disks)
        state = domain.state()
        found.append(
            DiscoveredDomain(
                spec=replace(spec, disks=disks),
                state=state,
                power=power_of(state),
                persistent=domain.persistent(),
            )
        )
    return sorted(found, key=lambda d: d.spec.name)


def switches(conn: Connection) -> set[str]:
    """The virtual switches of a host: every libvirt network's name and the
    bridge it names (``<bridge name=...>``), whether the network runs or not."""
    names: set[str] = set()
    for xml in conn.network_xmls():
        root = ET.fromstring(xml)
        names.add((root.findtext("name") or "").strip())
        bridge = root.find("bridge")
        if bridge is not None and bridge.get("name"):
            names.add(bridge.get("name", ""))
    return names - {""}
