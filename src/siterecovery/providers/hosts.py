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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.model import Host
from siterecovery.keys.master import write_private

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
