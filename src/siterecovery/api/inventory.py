"""Routes: sites, hosts, VMs and the lab."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field

from siterecovery.api.deps import Ctx
from siterecovery.api.models import Body, Size
from siterecovery.domain.errors import InvalidInput
from siterecovery.services import agents, images, inventory, lab, protection

router = APIRouter()


class SiteIn(Body):
    name: str
    provider: str = "local"
    path: str | None = None
    agent: str | None = None
    """``https://HOST:PORT`` of the site's agent (then ``join`` is its one-time token)."""
    join: str | None = None
    role: str = "on-premises"
    storage: str = "block"


class HostIn(Body):
    site: str
    name: str
    switches: list[str] = Field(default_factory=list)
    kind: str | None = None
    connected: bool = True
    uri: str | None = None
    """libvirt URI of a kvm host (``qemu:///system``, ``qemu+ssh://hv01/system``)."""


class SitePatch(Body):
    max_rate: Size
    """Bytes/s the site may send to other sites over all its transfers (0: no cap)."""


class HostPatch(Body):
    connected: bool | None = None
    add_switches: list[str] = Field(default_factory=list)
    remove_switches: list[str] = Field(default_factory=list)


class VmIn(Body):
    name: str
    host: str
    disks: list[Size] = Field(default_factory=list)
    os: str = "linux"
    switch: str | None = None
    workload: bool = True


class LabIn(Body):
    provider: str = "local"


@router.post("/lab/up")
def lab_up(ctx: Ctx, body: LabIn | None = None) -> dict[str, Any]:
    return lab.lab_up(ctx, provider=(body or LabIn()).provider)


@router.post("/lab/down")
def lab_down(ctx: Ctx) -> dict[str, Any]:
    return lab.lab_down(ctx)


@router.get("/sites")
def list_sites(ctx: Ctx) -> list[dict[str, Any]]:
    infos = agents.site_infos(ctx)
    return [{**s.to_dict(), "agent": infos.get(s.name)} for s in ctx.store.list_sites()]


@router.post("/sites", status_code=201)
def add_site(ctx: Ctx, body: SiteIn) -> dict[str, Any]:
    if body.agent is not None or body.join is not None:
        if not (body.agent and body.join):
            raise InvalidInput(field="join", reason="an agent site needs both agent and join")
        site = agents.add_agent_site(
            ctx, name=body.name, url=body.agent, token=body.join, role=body.role
        )
        return site.to_dict()
    if body.path is None:
        raise InvalidInput(field="path", reason="a site needs a path (or an agent)")
    fields = body.model_dump(exclude={"agent", "join"})
    return inventory.add_site(ctx, **fields).to_dict()


@router.patch("/sites/{name}")
def set_site(ctx: Ctx, name: str, body: SitePatch) -> dict[str, Any]:
    return inventory.set_site(ctx, name=name, max_rate=body.max_rate).to_dict()


@router.get("/hosts")
def list_hosts(ctx: Ctx, site: str | None = None) -> list[dict[str, Any]]:
    return [h.to_dict() for h in ctx.store.list_hosts(site=site)]


@router.post("/hosts", status_code=201)
def add_host(ctx: Ctx, body: HostIn) -> dict[str, Any]:
    return inventory.add_host(ctx, **body.model_dump()).to_dict()


@router.patch("/hosts/{name}")
def set_host(ctx: Ctx, name: str, body: HostPatch) -> dict[str, Any]:
    return inventory.set_host(ctx, name=name, **body.model_dump()).to_dict()


@router.get("/vms")
def list_vms(ctx: Ctx, site: str | None = None, host: str | None = None) -> list[dict[str, Any]]:
    return inventory.list_vms(ctx, site=site, host=host)


@router.post("/vms", status_code=201)
def create_vm(ctx: Ctx, body: VmIn) -> dict[str, Any]:
    vm = inventory.create_vm(ctx, **body.model_dump())
    return inventory.vm_view(ctx, vm)


@router.get("/vms/{name}")
def show_vm(ctx: Ctx, name: str, site: str | None = None) -> dict[str, Any]:
    return inventory.show_vm(ctx, name=name, site=site)


@router.delete("/vms/{name}")
def delete_vm(ctx: Ctx, name: str, site: str | None = None) -> dict[str, Any]:
    return inventory.delete_vm(ctx, name=name, site=site)


@router.post("/vms/{name}/start")
def start_vm(ctx: Ctx, name: str, site: str | None = None) -> dict[str, Any]:
    return inventory.start_vm(ctx, name=name, site=site)


class ImportIn(Body):
    name: str
    host: str
    disks: list[str]
    """Images at the host's site: VHDX, VHD, VMDK, qcow2 or raw."""
    switch: str | None = None
    os: str = "linux"
    cpus: int = 1
    memory_mib: int = 512


@router.post("/vms/import", status_code=201)
def import_vm(ctx: Ctx, body: ImportIn) -> dict[str, Any]:
    """A new VM from another hypervisor's disk images (converted at its site)."""
    return images.import_vm(ctx, **body.model_dump())


@router.post("/vms/{name}/adopt", status_code=201)
def adopt_vm(ctx: Ctx, name: str, host: str | None = None) -> dict[str, Any]:
    """Take in a domain defined on a kvm host by its owner (ready to protect)."""
    return inventory.vm_view(ctx, inventory.adopt_vm(ctx, name=name, host=host))


@router.post("/vms/{name}/stop")
def stop_vm(ctx: Ctx, name: str, site: str | None = None) -> dict[str, Any]:
    return inventory.stop_vm(ctx, name=name, site=site)


@router.get("/vms/{name}/check")
def check_vm(
    ctx: Ctx, name: str, site: str | None = None, point: str | None = None
) -> dict[str, Any]:
    return protection.check_vm(ctx, name=name, site=site, point=point)


@router.get("/checks")
def check_together(
    ctx: Ctx,
    vm: Annotated[list[str], Query()],
    site: str | None = None,
    point: Annotated[list[str] | None, Query()] = None,
) -> dict[str, Any]:
    """Check several VMs (or points of them) and the links between their records."""
    return protection.check_together(ctx, vms=vm, site=site, points=point)
