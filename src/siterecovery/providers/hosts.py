"""The hypervisor hosts of a site, as its agent knows them.

The vault holds the inventory (``hosts``: name, site, kind, URI, switches);
the site's agent holds what it needs to reach each host without asking the
engine: ``SITE/hosts.json``, ``{name: {"kind", "uri"}}``, written whole and
durably when a host is added (:meth:`HostBook.put`). A ``kvm`` host is a
libvirt connection: adding one connects to it first (an unreachable URI
changes nothing), its switches are its libvirt networks and their bridges,
and :func:`discover` lists its domains, ours or not.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from siterecovery.disk.tracking import DiskAccess
from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.model import Host, Site, Vm, VmPower
from siterecovery.keys.master import write_private
from siterecovery.providers.base import GuestAgent, Hypervisor

HOSTS_FILE = "hosts.json"
LIBVIRT_KIND = "kvm"


@dataclass(frozen=True, slots=True)
class HostEntry:
    name: str
    kind: str
    uri: str | None


class HostBook:
    """``SITE/hosts.json``: the hosts this site's agent reaches."""

    def __init__(self, site_dir: str | Path) -> None:
        self._path = Path(site_dir) / HOSTS_FILE

    def get(self, name: str) -> HostEntry | None:
        entry = self._read().get(name)
        if not isinstance(entry, dict):
            return None
        return HostEntry(name, str(entry.get("kind", "local")), entry.get("uri"))

    def put(self, entry: HostEntry) -> None:
        """Add or replace ``entry`` (idempotent: the same entry twice is one)."""
        doc = self._read()
        doc[entry.name] = {"kind": entry.kind, "uri": entry.uri}
        self._path.parent.mkdir(parents=True, exist_ok=True)
        write_private(self._path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            raise InvalidInput(field="hosts", reason=f"{self._path} is not JSON: {e}") from e
        return doc if isinstance(doc, dict) else {}


def probe(host: Host) -> list[str]:
    """The switches of ``host``, checked on the host itself when it has a URI:
    a libvirt host is connected to (HypervisorError naming the URI when it
    cannot be), and every switch asked for must be one of its networks or
    bridges (InvalidInput naming what it has). No switch asked for: all of
    the host's. libvirt-python is imported only here and in :func:`discover`:
    a site without a kvm host needs none."""
    if host.kind != LIBVIRT_KIND:
        return list(host.switches)
    if not host.uri:
        raise InvalidInput(field="uri", reason="a kvm host needs --uri (e.g. qemu:///system)")
    from siterecovery.providers.libvirt.connection import connect
    from siterecovery.providers.libvirt.domains import switches

    with connect(host.uri) as conn:
        present = switches(conn)
    missing = sorted(set(host.switches) - present)
    if missing:
        raise InvalidInput(
            field="switch",
            reason=(
                f"host {host.name} ({host.uri}) has no switch {', '.join(missing)}; "
                f"its networks and bridges: {', '.join(sorted(present)) or 'none'}"
            ),
        )
    return list(host.switches) if host.switches else sorted(present)


def discover(host: Host) -> list[dict[str, Any]]:
    """Every domain of a libvirt host (persistent, or running transient), with
    its power, disks and NICs; [] for a host without a URI (its VMs are the
    vault's)."""
    if host.kind != LIBVIRT_KIND or not host.uri:
        return []
    from siterecovery.providers.libvirt.connection import connect
    from siterecovery.providers.libvirt.domains import list_domains

    with connect(host.uri) as conn:
        found = list_domains(conn)
    return [
        {
            "name": d.spec.name,
            "host": host.name,
            "state": d.state,
            "power": d.power.value,
            "persistent": d.persistent,
            "cpus": d.spec.vcpus,
            "memory_mib": d.spec.memory // 2**20,
            "disks": [
                {
                    "target": disk.target,
                    "path": None if disk.path is None else str(disk.path),
                    "bus": disk.bus,
                    "format": disk.format,
                    "size": disk.size,
                }
                for disk in d.spec.disks
            ],
            "nics": [
                {"switch": nic.switch, "model": nic.model, "mac": nic.mac, "kind": nic.kind}
                for nic in d.spec.nics
            ],
            "guest_agent": d.spec.guest_agent,
        }
        for d in found
    ]


class DomainHypervisor(Hypervisor, Protocol):
    """A hypervisor whose hosts hold domains defined by their owners, which it
    can take in as VMs (libvirt)."""

    def adopt(self, site: Site, host: str, name: str) -> Vm:
        """The existing domain ``name`` of ``host`` as a VM of the site, its disks
        where they are. Idempotent; InvalidInput when it cannot be tracked."""
        ...


class HostRouter:
    """A site's :class:`~siterecovery.providers.base.Hypervisor`: each call goes
    to the hypervisor of the VM's host's kind (``kvm``: ``libvirt()``, made at
    the first such call; any other kind: the site provider's own, ``default``).
    A VM's host is looked up in the site's :class:`HostBook`; a host it does
    not list is of the default kind (the lab's local hosts)."""

    def __init__(self, default: Hypervisor, libvirt: Callable[[], DomainHypervisor]) -> None:
        self.kind = default.kind
        self._default = default
        self._make_libvirt = libvirt
        self._libvirt: DomainHypervisor | None = None
        self._guard = threading.Lock()

    def of(self, site: Site, vm: Vm) -> Hypervisor:
        """The hypervisor that runs ``vm``."""
        entry = HostBook(site.path).get(vm.host)
        if entry is None or entry.kind != LIBVIRT_KIND:
            return self._default
        return self._domains()

    def adopt(self, site: Site, host: str, name: str) -> Vm:
        """Take in the domain ``name`` that the owner of kvm ``host`` defined."""
        entry = HostBook(site.path).get(host)
        if entry is None or entry.kind != LIBVIRT_KIND:
            raise InvalidInput(
                field="host", reason=f"host {host} is not a kvm host of site {site.name}"
            )
        return self._domains().adopt(site, host, name)

    def _domains(self) -> DomainHypervisor:
        with self._guard:
            if self._libvirt is None:
                self._libvirt = self._make_libvirt()
            return self._libvirt

    def create_vm(
        self,
        site: Site,
        vm: Vm,
        *,
        bases: dict[str, Path] | None = None,
        checkpoint: str | None = None,
    ) -> None:
        self.of(site, vm).create_vm(site, vm, bases=bases, checkpoint=checkpoint)

    def replace_disks(self, site: Site, vm: Vm) -> None:
        self.of(site, vm).replace_disks(site, vm)

    def add_checkpoint(self, site: Site, vm: Vm, checkpoint: str) -> None:
        self.of(site, vm).add_checkpoint(site, vm, checkpoint)

    def delete_vm(self, site: Site, vm: Vm) -> None:
        self.of(site, vm).delete_vm(site, vm)

    def start_vm(self, site: Site, vm: Vm) -> None:
        self.of(site, vm).start_vm(site, vm)

    def stop_vm(self, site: Site, vm: Vm, *, timeout: float = 30.0) -> None:
        self.of(site, vm).stop_vm(site, vm, timeout=timeout)

    def power(self, site: Site, vm: Vm) -> VmPower:
        return self.of(site, vm).power(site, vm)

    def disk_access(self, site: Site, vm: Vm) -> AbstractContextManager[DiskAccess]:
        return self.of(site, vm).disk_access(site, vm)

    def guest(self, site: Site, vm: Vm) -> GuestAgent | None:
        return self.of(site, vm).guest(site, vm)

    def guest_state(self, site: Site, vm: Vm) -> dict[str, object]:
        return self.of(site, vm).guest_state(site, vm)

    def is_inconsistent(self, site: Site, vm: Vm) -> bool:
        return self.of(site, vm).is_inconsistent(site, vm)

    def set_inconsistent(self, site: Site, vm: Vm, value: bool) -> None:
        self.of(site, vm).set_inconsistent(site, vm, value)

    def disk_image(self, site: Site, vm: Vm, disk: str) -> Path:
        return self.of(site, vm).disk_image(site, vm, disk)

    def reads_through(self, site: Site, vm: Vm) -> set[Path]:
        return self.of(site, vm).reads_through(site, vm)
