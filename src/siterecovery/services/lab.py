"""The lab: the embedded default a newcomer starts from (idempotent).

``make run`` (``serve --lab``) makes each lab site a site agent on loopback
(``agent/local.py``), joined with a one-time token like a remote site, so the
two sites exchange their bytes on the wire as real ones do; the API's
``POST /lab/up`` on a vault without sites, and ``serve --lab`` with
``SITERECOVERY_LAB_AGENTS=0``, make them directories served in the engine's
process instead (the test suite's default: faster to start).
"""

from __future__ import annotations

from typing import Any

from siterecovery.agent.local import LocalAgents
from siterecovery.context import Context
from siterecovery.domain.errors import AgentUnreachable, HypervisorError
from siterecovery.domain.model import SiteRole
from siterecovery.services import inventory
from siterecovery.services.agents import add_agent_site
from siterecovery.store.agents import find_agent

SITES = (
    ("onprem", SiteRole.ON_PREMISES, "hv01"),
    ("cloud", SiteRole.CLOUD, "cloud-host"),
)
SWITCH = "vswitch-prod"
VMS = (("web01", "hv01", None), ("db01", "hv01", "web01"))
"""(VM, host, the VM its workload's records depend on): db01's rows refer to web01's."""
DISK = "1G"


def lab_up(ctx: Context, *, agents: LocalAgents | None = None) -> dict[str, Any]:
    """Sites onprem and cloud, their hosts, and running VMs web01 and db01.

    With ``agents`` (what ``serve --lab`` passes), each new site is a local
    agent process joined like a remote site (:func:`start_agents`); without,
    the sites are directories served in the engine's process. A site the
    vault already has keeps its kind.
    """
    existing_sites = {s.name for s in ctx.store.list_sites()}
    existing_hosts = {h.name for h in ctx.store.list_hosts()}
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
        if host not in existing_hosts:
            inventory.add_host(ctx, site=name, name=host, switches=[SWITCH])
    for vm, host, link in VMS:
        if not ctx.store.find_vms(name=vm):
            inventory.create_vm(
                ctx, name=vm, host=host, disks=[DISK], switch=SWITCH, workload_link=link
            )
        else:
            _start_where_it_runs(ctx, vm)
    return {
        "sites": [s.to_dict() for s in ctx.store.list_sites()],
        "hosts": [h.to_dict() for h in ctx.store.list_hosts()],
        "vms": inventory.list_vms(ctx),
    }


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
    return {"stopped": stopped, "failed": failed}
