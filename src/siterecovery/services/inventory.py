"""Sites, hosts and VMs: the inventory the vault keeps and the providers run.

Every function validates all of its input before its first side effect, so a
refused call leaves the vault and the disks as they were.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from siterecovery.context import AGENT_PROVIDER, Context
from siterecovery.domain.errors import (
    AgentUnreachable,
    AlreadyExists,
    HypervisorError,
    InvalidInput,
    SitePathRefused,
    VmBusy,
    VmNotFound,
)
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import DiskDef, Host, OsType, Site, Vm, VmPower
from siterecovery.domain.values import check_name, parse_role, parse_size
from siterecovery.providers.hosts import LIBVIRT_KIND
from siterecovery.services import agents

MAX_DISKS = 8
DEFAULT_DISK = "1G"
MAX_DISK_SIZE = 64 << 40
"""Bytes: the largest disk a VM gets (a VHDX's limit; qcow2 and raw go further)."""


STORAGE_KINDS = ("block", "managed")
REPLICATING = frozenset(
    {
        ItemState.ENABLING,
        ItemState.PROTECTED,
        ItemState.REPROTECTING,
        ItemState.SYNCING,
        ItemState.AWAITING_COMPLETION,
        ItemState.FINALIZING,
    }
)
HYPERVISOR_KINDS = ("local", "kvm", "hyperv", "vmware")


def add_site(
    ctx: Context, *, name: str, provider: str, path: str, role: str, storage: str = "block"
) -> Site:
    """A site whose storage is the directory ``path`` (see :func:`site_path`)."""
    check_name("name", name)
    role_value = parse_role(role)
    impl = ctx.provider(provider)
    if storage not in STORAGE_KINDS:
        raise InvalidInput(field="storage", reason=f"'{storage}' is not one of {STORAGE_KINDS}")
    sites = ctx.store.list_sites()
    if any(s.name == name for s in sites):
        raise AlreadyExists(kind="site", name=name)
    root = site_path(path, name=name, others=[Path(s.path) for s in sites])
    site = Site(name=name, provider=provider, path=str(root), role=role_value)
    try:
        impl.prepare_site(site, storage=storage)
    except OSError as exc:
        raise SitePathRefused(path=path, reason=f"cannot be made: {exc.strerror}") from None
    return ctx.store.add_site(site=site)


def site_path(path: str, *, name: str, others: list[Path]) -> Path:
    """The confined storage directory of a new site, or :class:`SitePathRefused`.

    Deleting a VM removes ``SITE/vms/VM``: a site's directory must hold only
    what we put there. So it is absolute (symbolic links resolved), not ``/``,
    neither inside nor around another site's directory, and either absent (it
    is created), empty, or a site directory we made for this same name.
    """
    if "\0" in path or not os.path.isabs(path):
        raise SitePathRefused(path=path, reason="is not an absolute path")
    try:
        root = Path(path).resolve()
        taken = root.exists() and not _ours_or_empty(root, name)
        sites = [other.resolve() for other in others]
    except (OSError, ValueError) as exc:  # too long, undecodable, unreadable
        raise SitePathRefused(path=path, reason=f"cannot be used: {exc}") from None
    if root == Path(root.anchor):
        raise SitePathRefused(path=path, reason="is the root directory")
    for other in sites:
        if root == other or other in root.parents or root in other.parents:
            raise SitePathRefused(path=path, reason=f"overlaps the site directory {other}")
    if taken:
        reason = "already holds files that are not a site of this name: give a new or empty one"
        raise SitePathRefused(path=path, reason=reason)
    return root


def _ours_or_empty(root: Path, name: str) -> bool:
    if not root.is_dir():
        return False
    if not any(root.iterdir()):
        return True
    try:
        marker = json.loads((root / "site.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("name") == name


def add_host(
    ctx: Context,
    *,
    site: str,
    name: str,
    switches: list[str],
    kind: str | None = None,
    connected: bool = True,
    uri: str | None = None,
) -> Host:
    """A host of ``site``; ``kind`` is its hypervisor (the provider's own by default).

    A ``kvm`` host is a libvirt connection (``uri``): the site's agent connects
    to it before anything is recorded, checks each switch asked for among its
    networks and bridges, and takes them all when none is asked for.
    """
    check_name("name", name)
    for switch in switches:
        check_name("switch", switch)
    owner = ctx.store.get_site(name=site)
    kind = kind or ("kvm" if uri else None)
    kind = kind or ("local" if owner.provider == AGENT_PROVIDER else ctx.provider(owner).kind)
    if kind not in HYPERVISOR_KINDS:
        raise InvalidInput(field="kind", reason=f"'{kind}' is not one of {HYPERVISOR_KINDS}")
    if kind == LIBVIRT_KIND and not uri:
        raise InvalidInput(
            field="uri", reason="a kvm host is a libvirt URI: add --uri qemu:///system"
        )
    if uri is not None and kind != LIBVIRT_KIND:
        raise InvalidInput(field="uri", reason=f"only a kvm host has a URI, not a {kind} host")
    if uri is not None and (len(uri) > 512 or not uri.strip() or any(c.isspace() for c in uri)):
        raise InvalidInput(field="uri", reason="a libvirt URI such as qemu+ssh://hv01/system")
    if any(h.name == name for h in ctx.store.list_hosts()):
        raise AlreadyExists(kind="host", name=name)
    host = Host(owner.name, name, tuple(switches), connected=connected, kind=kind, uri=uri)
    found = ctx.site(owner).add_host(host)
    return ctx.store.add_host(host=replace(host, switches=tuple(found)))


def set_site(ctx: Context, *, name: str, max_rate: str | int) -> Site:
    """Set the site's sending cap: bytes/s summed over every transfer it sends to
    another site at once (0: none). It applies from each transfer's next start."""
    rate = parse_size("max-rate", max_rate, minimum=0) if max_rate not in (0, "0") else 0
    return ctx.store.update_site(name=name, max_rate=rate)


def set_host(
    ctx: Context,
    *,
    name: str,
    connected: bool | None = None,
    add_switches: Sequence[str] = (),
    remove_switches: Sequence[str] = (),
) -> Host:
    """Mark a host connected or not (a disconnected host takes no failover), and
    add or remove its virtual switches. A switch added to a kvm host must be
    one of its libvirt networks or bridges (checked there by the site's
    agent); a switch removed must be the host's and no VM of the host may
    have a NIC on it. Everything is checked before anything changes."""
    host = ctx.store.get_host(name=name)
    if connected is None and not add_switches and not remove_switches:
        raise InvalidInput(
            field="host", reason="nothing to change: give --connected/--disconnected, "
            "--switch NAME or --remove-switch NAME",
        )  # fmt: skip
    for switch in (*add_switches, *remove_switches):
        check_name("switch", switch)
    both = sorted(set(add_switches) & set(remove_switches))
    if both:
        raise InvalidInput(field="switch", reason=f"{both[0]} is both added and removed")
    unknown = sorted(set(remove_switches) - set(host.switches))
    if unknown:
        raise InvalidInput(
            field="switch", reason=f"host {name} has no switch {unknown[0]}; its switches: "
            f"{', '.join(host.switches) or 'none'}",
        )  # fmt: skip
    for vm in ctx.store.find_vms():
        used = sorted(set(vm.nics) & set(remove_switches)) if vm.host == name else []
        if used:
            raise VmBusy(
                vm=vm.name, state=f"on host {name} with a NIC on switch {used[0]}",
                hint=f"delete it or fail it over elsewhere before removing {used[0]}",
            )  # fmt: skip
    new = [s for s in dict.fromkeys(add_switches) if s not in host.switches]
    if new:
        ctx.site(ctx.store.get_site(name=host.site)).add_host(replace(host, switches=tuple(new)))

    def changed(switches: tuple[str, ...]) -> tuple[str, ...]:
        kept = [s for s in switches if s not in remove_switches]
        return tuple(dict.fromkeys([*kept, *add_switches]))

    return ctx.store.update_host(name=name, connected=connected, change_switches=changed)


def delete_vm(ctx: Context, *, name: str, site: str | None = None) -> dict[str, Any]:
    """Stop and delete a VM with its disks (refused while it is protected from there)."""
    vm = ctx.store.get_vm(name=name, site=site)
    item = ctx.store.find_item(vm=name)
    if item is not None and item.active_site == vm.site and item.state in REPLICATING:
        raise VmBusy(
            vm=name,
            state=f"replicated ({item.state.value})",
            hint=f"disable protection first (`siterecovery disable {name}`)",
        )
    owner = ctx.store.get_site(name=vm.site)
    ctx.site(owner).delete_vm(vm)
    ctx.store.delete_vm(name=name, site=vm.site)
    return {"deleted": f"{name}@{vm.site}"}


def create_vm(
    ctx: Context,
    *,
    name: str,
    host: str,
    disks: list[str],
    os: str = "linux",
    switch: str | None = None,
    workload: bool = True,
    start: bool = True,
    workload_link: str | None = None,
) -> Vm:
    """Create a VM on ``host`` with blank disks, and start it unless told not to.

    ``workload_link`` names a VM whose records this VM's lab workload depends on.
    """
    vm = _new_vm(ctx, name=name, host=host, disks=disks, os=os, switch=switch, workload=workload)
    if workload_link is not None:
        check_name("workload_link", workload_link)
        vm = replace(vm, workload_link=workload_link)
    agent = ctx.site(vm.site)
    agent.create_vm(vm)
    ctx.store.add_vm(vm=vm)
    if start:
        agent.start_vm(vm)
    return vm


def _new_vm(
    ctx: Context,
    *,
    name: str,
    host: str,
    disks: list[str],
    os: str,
    switch: str | None,
    workload: bool,
) -> Vm:
    check_name("name", name)
    owner = ctx.store.get_host(name=host)
    sizes = [
        parse_size("disk", d, minimum=64 << 20, maximum=MAX_DISK_SIZE)
        for d in disks or [DEFAULT_DISK]
    ]
    if len(sizes) > MAX_DISKS:
        raise InvalidInput(field="disk", reason=f"at most {MAX_DISKS} disks, got {len(sizes)}")
    nic = switch or (owner.switches[0] if owner.switches else None)
    if nic is not None and nic not in owner.switches:
        raise InvalidInput(
            field="switch",
            reason=f"host '{host}' has no switch '{nic}' (it has: {', '.join(owner.switches)})",
        )
    if ctx.store.find_vms(name=name):
        raise AlreadyExists(kind="VM", name=name)
    return Vm(
        name=name,
        site=owner.site,
        host=owner.name,
        os=os_type(os),
        disks=tuple(DiskDef(name=f"d{i}", size=s) for i, s in enumerate(sizes)),
        nics=(nic,) if nic else (),
        workload=workload,
    )


def os_type(value: str) -> OsType:
    try:
        return OsType(value)
    except ValueError:
        raise InvalidInput(field="os", reason=f"'{value}' is not one of linux, windows") from None


def vm_view(ctx: Context, vm: Vm) -> dict[str, Any]:
    """The JSON of a VM: its definition, power state and guest state."""
    site = ctx.store.get_site(name=vm.site)
    agent = ctx.site(site)
    view = {**vm.to_dict(), "power": agent.power(vm).value}
    view["guest"] = agent.guest_state(vm)
    return view


def list_vms(
    ctx: Context, *, site: str | None = None, host: str | None = None
) -> list[dict[str, Any]]:
    """Every VM (of ``site``, of ``host``). A VM whose site's agent does not
    answer (cached as unreachable by the daemon's health monitor, or failing
    now) is listed with power ``unknown`` and the error, never hiding the
    others: in a disaster the list is what the administrator looks at first.

    With a kvm ``host``, the host itself is asked: its domains that the vault
    does not know are listed too, ``managed: false`` (they can be protected).
    """
    if site is not None:
        ctx.store.get_site(name=site)
    found = ctx.store.get_host(name=host) if host is not None else None
    views = [
        {**view, "managed": True}
        for view in _vault_vms(ctx, site)
        if found is None or view["host"] == found.name
    ]
    if found is not None and (site is None or found.site == site):
        known = {view["name"] for view in views if view["site"] == found.site}
        views += [_discovered(d, found) for d in ctx.site(found.site).discover(found)
                  if d["name"] not in known]  # fmt: skip
    return views


def adopt_vm(ctx: Context, *, name: str, host: str | None = None) -> Vm:
    """Take in a domain that the owner of a kvm host defined (``host``, or the
    one kvm host that has a domain of that name): it becomes a VM of the
    host's site, its disks where they are, ready to protect."""
    if ctx.store.find_vms(name=name):
        raise AlreadyExists(kind="VM", name=name)
    hosts = [ctx.store.get_host(name=host)] if host else ctx.store.list_hosts()
    kvm = [h for h in hosts if h.kind == LIBVIRT_KIND]
    if host is not None and not kvm:
        raise InvalidInput(
            field="host", reason=f"host {host} is not a kvm host (add one with --uri)"
        )
    holders = [h for h in kvm if name in {d["name"] for d in ctx.site(h.site).discover(h)}]
    if not holders:
        raise VmNotFound(name=name)
    if len(holders) > 1:
        names = ", ".join(h.name for h in holders)
        raise InvalidInput(
            field="host", reason=f"hosts {names} each have a domain '{name}': name one"
        )
    (owner,) = holders
    vm = ctx.site(owner.site).adopt_domain(owner, name)
    return ctx.store.add_vm(vm=vm)


def _discovered(domain: dict[str, Any], host: Host) -> dict[str, Any]:
    """A domain of a host that the vault does not know, in a VM's shape."""
    return {
        "name": domain["name"],
        "site": host.site,
        "host": host.name,
        "os": "unknown",
        "power": domain["power"],
        "disks": [{"name": d["target"], "size": d["size"] or 0} for d in domain["disks"]],
        "nics": [n["switch"] for n in domain["nics"] if n["switch"]],
        "cpus": domain["cpus"],
        "memory_mib": domain["memory_mib"],
        "managed": False,
        "domain": domain,
    }


def _vault_vms(ctx: Context, site: str | None) -> list[dict[str, Any]]:
    views = []
    for vm in ctx.store.find_vms(site=site):
        health = agents.site_health(ctx, vm.site)
        if health is not None and not health.reachable:
            views.append(_unknown(vm, AgentUnreachable(site=vm.site, url=health.url,
                                                       detail=health.message or "")))  # fmt: skip
            continue
        try:
            views.append(vm_view(ctx, vm))
        except (AgentUnreachable, HypervisorError) as e:
            # Its site's agent, or its host's hypervisor, does not answer.
            views.append(_unknown(vm, e))
    return views


def _unknown(vm: Vm, error: AgentUnreachable | HypervisorError) -> dict[str, Any]:
    return {**vm.to_dict(), "power": "unknown", "guest": {}, "unreachable": error.to_dict()}


def show_vm(ctx: Context, *, name: str, site: str | None = None) -> dict[str, Any]:
    return vm_view(ctx, ctx.store.get_vm(name=name, site=site))


def start_vm(ctx: Context, *, name: str, site: str | None = None) -> dict[str, Any]:
    vm = ctx.store.get_vm(name=name, site=site)
    owner = ctx.store.get_site(name=vm.site)
    ctx.site(owner).start_vm(vm)
    return vm_view(ctx, vm)


def stop_vm(ctx: Context, *, name: str, site: str | None = None) -> dict[str, Any]:
    vm = ctx.store.get_vm(name=name, site=site)
    owner = ctx.store.get_site(name=vm.site)
    ctx.site(owner).stop_vm(vm)
    return vm_view(ctx, vm)


def power(ctx: Context, vm: Vm) -> VmPower:
    site = ctx.store.get_site(name=vm.site)
    return ctx.site(site).power(vm)
