"""The lab: the embedded default a newcomer starts from (idempotent).

``make run`` (``serve --lab``) makes each lab site a site agent on loopback
(``agent/local.py``), joined with a one-time token like a remote site, so the
two sites exchange their bytes on the wire as real ones do; the API's
``POST /lab/up`` on a vault without sites, and ``serve --lab`` with
``SITERECOVERY_LAB_AGENTS=0``, make them directories served in the engine's
process instead (the test suite's default: faster to start).

Hosts: by default the lab's hosts are ``local`` (a VM is a qemu-storage-daemon
and a writer process). ``lab up --provider libvirt`` (``serve --lab
--lab-provider libvirt``) makes each lab host a private libvirtd on this
machine (``VAULT/lab-hosts/HOST``, :mod:`siterecovery.providers.libvirt.private`)
added as a ``kvm`` host, with the libvirt networks ``vswitch-prod`` and the
drills' isolated switch, and the VMs real Linux guests (the lab guest under
TCG, writing its journal on its disk). Those daemons are the lab's hypervisor
hosts: they outlive the engine like a real host, and ``lab down`` stops them
with their VMs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from siterecovery.agent.local import LocalAgents
from siterecovery.context import Context
from siterecovery.domain.errors import AgentUnreachable, HypervisorError, InvalidInput
from siterecovery.domain.model import SiteRole
from siterecovery.providers.hosts import LIBVIRT_KIND
from siterecovery.services import inventory
from siterecovery.services.agents import add_agent_site
from siterecovery.services.failover import DRILL_SWITCH
from siterecovery.store.agents import find_agent

if TYPE_CHECKING:
    from siterecovery.providers.libvirt.private import PrivateLibvirtd

SITES = (
    ("onprem", SiteRole.ON_PREMISES, "hv01"),
    ("cloud", SiteRole.CLOUD, "cloud-host"),
)
SWITCH = "vswitch-prod"
VMS = (("web01", "hv01", None), ("db01", "hv01", "web01"))
"""(VM, host, the VM its workload's records depend on): db01's rows refer to web01's."""
DISK = "1G"
PROVIDERS = ("local", "libvirt")
"""What the lab's hosts are: local (daemon and writer) or private libvirtds."""
LAB_HOSTS = "lab-hosts"
"""``VAULT/lab-hosts/HOST``: the private libvirtd of a libvirt lab's host."""
BRIDGES = {SWITCH: "srprod0", DRILL_SWITCH: "srdrill0"}
"""A libvirt lab host's networks and their bridges (in the host's own netns)."""


def lab_up(
    ctx: Context, *, agents: LocalAgents | None = None, provider: str = "local"
) -> dict[str, Any]:
    """Sites onprem and cloud, their hosts, and running VMs web01 and db01.

    With ``agents`` (what ``serve --lab`` passes), each new site is a local
    agent process joined like a remote site (:func:`start_agents`); without,
    the sites are directories served in the engine's process. A site the
    vault already has keeps its kind. ``provider`` is what the hosts are (see
    the module's docstring); a lab whose hosts are of the other kind already
    is refused before anything changes.
    """
    libvirt = _check_provider(ctx, provider)
    existing_sites = {s.name for s in ctx.store.list_sites()}
    existing_hosts = {h.name for h in ctx.store.list_hosts()}
    uris = {host: _ensure_lab_host(ctx, host) for _, _, host in SITES} if libvirt else {}
    for name, role, host in SITES:
        if name in existing_sites:
            pass
        elif agents is not None:
            agent = agents.ensure(name)
            add_agent_site(ctx, name=name, url=agent.url, token=agents.token(name),
                           role=role.value)  # fmt: skip
        else:
            path = ctx.vault_dir / "sites" / name
            inventory.add_site(ctx, name=name, provider="local", path=str(path), role=role.value)
        if host not in existing_hosts and libvirt:
            inventory.add_host(ctx, site=name, name=host, switches=list(BRIDGES), uri=uris[host])
        elif host not in existing_hosts:
            inventory.add_host(ctx, site=name, name=host, switches=[SWITCH])
    for vm, host, link in VMS:
        if not ctx.store.find_vms(name=vm):
            # The lab guest's journal has no cross-VM references: no link on libvirt.
            inventory.create_vm(
                ctx, name=vm, host=host, disks=[DISK], switch=SWITCH,
                workload_link=None if libvirt else link,
            )  # fmt: skip
        else:
            _start_where_it_runs(ctx, vm)
    return {
        "sites": [s.to_dict() for s in ctx.store.list_sites()],
        "hosts": [h.to_dict() for h in ctx.store.list_hosts()],
        "vms": inventory.list_vms(ctx),
    }


def _check_provider(ctx: Context, provider: str) -> bool:
    """Whether the lab is a libvirt one; refuses an unknown provider, and one
    the lab's existing hosts are not (a lab does not change its hosts' kind)."""
    if provider not in PROVIDERS:
        raise InvalidInput(field="provider", reason=f"'{provider}' is not one of {PROVIDERS}")
    wanted = provider == "libvirt"
    lab_hosts = {host for _, _, host in SITES}
    for host in ctx.store.list_hosts():
        if host.name in lab_hosts and (host.kind == LIBVIRT_KIND) != wanted:
            current = "libvirt" if host.kind == LIBVIRT_KIND else "local"
            raise InvalidInput(
                field="provider",
                reason=f"the lab's host {host.name} is a {host.kind} host already: "
                f"run 'lab up --provider {current}', or start a {provider} lab on a new vault",
            )
    return wanted


def lab_host(ctx: Context, name: str) -> PrivateLibvirtd:
    """The private libvirtd of a libvirt lab's host ``name`` (running or not)."""
    from siterecovery.providers.libvirt.private import PrivateLibvirtd

    return PrivateLibvirtd(ctx.vault_dir / LAB_HOSTS / name, name)


def _ensure_lab_host(ctx: Context, name: str) -> str:
    """The lab host ``name`` running, with its networks; its URI. Idempotent:
    a daemon that runs already (an earlier engine started it) is kept."""
    from siterecovery.providers.libvirt.private import unavailable

    why = unavailable()
    if why is not None:
        raise InvalidInput(field="provider", reason=f"a libvirt lab cannot run here: {why}")
    host = lab_host(ctx, name)
    if host.running() is None:
        seeds = [d / "cache" for d in (ctx.vault_dir / LAB_HOSTS).glob("*") if d.name != name]
        host.prepare(seed_cache=next((d for d in seeds if (d / "qemu").is_dir()), None))
        host.start(detached=True)
        host.warm()
    for switch, bridge in BRIDGES.items():
        host.ensure_network(switch, bridge)
    return host.uri


def _stop_lab_hosts(ctx: Context) -> list[str]:
    """Stop the libvirt lab's private hosts that run (their domains are kept
    defined, their disks in the sites); their names."""
    stopped = []
    root: Path = ctx.vault_dir / LAB_HOSTS
    for directory in sorted(root.glob("*")) if root.is_dir() else []:
        host = lab_host(ctx, directory.name)
        if host.running() is not None:
            host.stop()
            stopped.append(directory.name)
    return stopped


def start_agents(ctx: Context, agents: LocalAgents) -> list[str]:
    """The agent process of every lab site the vault knows as one of ``agents``
    (the port it joined with), running: before the engine resumes its jobs,
    which call them. Returns their sites."""
    started = []
    for site in ctx.store.list_sites():
        record = find_agent(ctx.store, site=site.name)
        if record is not None and agents.directory(site.name).is_dir():
            agents.ensure(site.name, url=record.url)
            started.append(site.name)
    return started


def _start_where_it_runs(ctx: Context, name: str) -> None:
    """Restart the lab VM's live copy only: after a failover the copy left at
    the other site stays stopped (starting both would split the brain)."""
    item = ctx.store.find_item(vm=name)
    for vm in ctx.store.find_vms(name=name):
        if item is None or vm.site == item.active_site:
            inventory.start_vm(ctx, name=vm.name, site=vm.site)


def lab_down(ctx: Context) -> dict[str, Any]:
    """Stop every VM of every site cleanly (disks and vault are kept). A VM whose
    site or host does not answer is reported in ``failed`` with its error, and
    the others are stopped all the same."""
    stopped, failed = [], []
    for vm in ctx.store.find_vms():
        try:
            ctx.site(vm.site).stop_vm(vm)
        except (AgentUnreachable, HypervisorError) as e:
            failed.append({"vm": f"{vm.name}@{vm.site}", "error": e.to_dict()})
            continue
        stopped.append(f"{vm.name}@{vm.site}")
    return {"stopped": stopped, "failed": failed, "hosts_stopped": _stop_lab_hosts(ctx)}
