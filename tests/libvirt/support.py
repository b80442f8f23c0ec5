"""Helpers of the libvirt tests: a connection to a private host, the lab guest
as a domain on it, and waits with a deadline (a loaded host boots slowly)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from siterecovery.disk.file import FileDevice
from siterecovery.domain.errors import GuestError
from siterecovery.providers.libvirt.domains import (
    DirectBoot,
    DiskSpec,
    DomainSpec,
    NicSpec,
    domain_xml,
    switches,
)
from siterecovery.providers.libvirt.guest_image import GuestImage, detect_accel
from siterecovery.providers.local import journal

from .libvirtd import LibvirtHost

MiB = 2**20
AGENT_TIMEOUT = 180.0
"""Seconds a TCG boot may take until the guest's workload answers (a loaded host)."""


def connect(host: LibvirtHost) -> Any:
    """Our connection to ``host`` (imported here: the XML tests need no libvirt)."""
    from siterecovery.providers.libvirt.connection import connect as open_connection

    return open_connection(host.uri)


def lab_domain(host: LibvirtHost, image: GuestImage, name: str, *, seed: int) -> DomainSpec:
    """The lab guest as a domain: direct kernel boot, a new qcow2 disk in the host's
    directory, the guest agent channel and a serial console log (the guest's init
    needs a console: without a serial port its agent cannot write and it powers off)."""
    disk = host.dir / "lib" / "images" / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    return DomainSpec(
        name=name,
        memory=256 * MiB,
        virt_type="kvm" if detect_accel(image) == "kvm" else "qemu",
        machine="q35",
        disks=(DiskSpec("vda", disk),),
        nics=(NicSpec("52:54:00:5e:00:01", "sr-lab"),),
        guest_agent=True,
        boot=DirectBoot(image.kernel, image.initramfs, image.cmdline(rate=20, seed=seed)),
        console_log=host.dir / f"{name}-console.log",
    )


def ensure_lab_network(conn: Any) -> None:
    """An isolated network (a bridge, no IP, hence no dnsmasq: not installed here)."""
    if "sr-lab" not in switches(conn):
        conn.define_network("<network><name>sr-lab</name><bridge name='srlab0'/></network>")


def wait_until(what: Callable[[], Any], description: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with_value = what()
        if with_value:
            return with_value
        if time.monotonic() > deadline:
            raise AssertionError(f"{description} not within {timeout} s")
        time.sleep(0.1)


def workload_status(domain: Any) -> dict[str, Any] | None:
    """``sr-status`` through libvirt's agent channel; None until the workload runs."""
    try:
        status: dict[str, Any] = domain.agent_command("sr-status", timeout=5)
    except GuestError:
        return None
    return status if status["seq"] >= 1 else None


def journal_of(disk: Path, work: Path) -> journal.CheckReport:
    """The journal check ``vm check`` runs, on a raw copy of a stopped domain's disk."""
    raw = work / f"{disk.stem}-copy.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(disk), str(raw)], check=True
    )
    try:
        with FileDevice.open(raw) as device:
            return journal.check([device])
    finally:
        raw.unlink()


def boot_lab_guest(
    conn: Any, host: LibvirtHost, image: GuestImage, name: str, seed: int
) -> tuple[Any, float]:
    """Define and start the lab guest; the domain, and seconds from define until
    the guest agent answered ``guest-ping`` (the workload answers soon after)."""
    ensure_lab_network(conn)
    spec = lab_domain(host, image, name, seed=seed)
    started = time.monotonic()
    domain = conn.define(domain_xml(spec))
    domain.start()

    def pinged() -> bool:
        assert domain.state() == "running", (host.dir / f"{name}-console.log").read_text()
        try:
            return bool(domain.agent_command("guest-ping", timeout=5) == {})
        except GuestError:
            return False

    wait_until(pinged, "guest-ping", AGENT_TIMEOUT)
    to_agent = time.monotonic() - started
    wait_until(lambda: workload_status(domain), "the workload's first record", AGENT_TIMEOUT)
    return domain, to_agent


def shut_down(domain: Any) -> float:
    """Power off through the guest agent (the lab guest has no ACPI handler: the
    power button is ignored); seconds until libvirt reports it shut off."""
    started = time.monotonic()
    domain.shutdown(agent=True)
    wait_until(lambda: domain.state() == "shutoff", "shut off", 60.0)
    return time.monotonic() - started
