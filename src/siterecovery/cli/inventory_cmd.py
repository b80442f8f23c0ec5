"""Commands of the inventory: ``lab up``, ``site``, ``host`` and ``vm``.

Values go to the daemon as given (it validates them, as for any API client);
options not given are left out so the daemon's defaults apply. Paths are made
absolute here, since the daemon does not share the caller's working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from siterecovery.cli import render
from siterecovery.cli.client import NO_TIMEOUT, segment
from siterecovery.cli.session import JsonOpt, Session, SiteOpt, VaultOpt

lab_app = typer.Typer(
    help="The embedded lab: two sites, their hosts, two VMs.", no_args_is_help=True
)
site_app = typer.Typer(help="Add, list and set sites.", no_args_is_help=True)
host_app = typer.Typer(help="Add and list hypervisor hosts.", no_args_is_help=True)
vm_app = typer.Typer(help="Create, list, show, start, stop and check VMs.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="VM name.")]


@lab_app.command("up")
def lab_up(
    ctx: typer.Context,
    provider: Annotated[
        str,
        typer.Option(
            "--provider",
            metavar="local|libvirt",
            help="The lab's hosts: local (storage daemons) or libvirt (private libvirtds on "
            "this machine with real Linux guests; root).",
        ),
    ] = "local",
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create (or restart) the lab: sites onprem and cloud, hosts, VMs web01 and db01."""
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.post("/lab/up", {"provider": provider}, read_timeout=NO_TIMEOUT)
        session.emit(answer, render.lab)


@lab_app.command("down")
def lab_down(ctx: typer.Context, vault: VaultOpt = None, json_out: JsonOpt = False) -> None:
    """Stop every VM cleanly (disks, replicas and the vault are kept)."""
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.post("/lab/down", read_timeout=NO_TIMEOUT)
        session.emit(answer, render.lab_down)


@site_app.command("add")
def site_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Site name.")],
    path: Annotated[
        Path | None, typer.Option("--path", metavar="DIR", help="Storage directory (local site).")
    ] = None,
    agent: Annotated[
        str | None,
        typer.Option("--agent", metavar="https://HOST:PORT", help="The site's agent."),
    ] = None,
    join: Annotated[
        str | None,
        typer.Option(
            "--join", metavar="TOKEN", help="The agent's one-time join token (`agent token`)."
        ),
    ] = None,
    provider: Annotated[
        str, typer.Option("--provider", metavar="PROVIDER", help="Site provider.")
    ] = "local",
    role: Annotated[
        str | None,
        typer.Option("--role", metavar="on-premises|cloud", help="Role (default on-premises)."),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            metavar="block|managed",
            help="Disk storage; managed storage has no block access (no failback from it).",
        ),
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a site."""
    body = {
        "name": name,
        "provider": provider,
        "path": str(path.absolute()) if path else None,
        "agent": agent,
        "join": join,
        "role": role,
        "storage": storage,
    }
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.post("/sites", body), render.site)


@site_app.command("list")
def site_list(ctx: typer.Context, vault: VaultOpt = None, json_out: JsonOpt = False) -> None:
    """List the sites."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get("/sites"), render.sites)


@site_app.command("set")
def site_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Site name.")],
    max_rate: Annotated[
        str,
        typer.Option(
            "--max-rate",
            metavar="RATE",
            help="Bytes/s the site may send to other sites, summed over all its transfers "
            "at once, e.g. 100M (0: no cap); each item's --max-rate applies too.",
        ),
    ],
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Set a site's bandwidth cap for what it sends to other sites."""
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.request(
            "PATCH", f"/sites/{segment(name)}", body={"max_rate": max_rate}
        )
        session.emit(answer, render.site)


@host_app.command("add")
def host_add(
    ctx: typer.Context,
    site: Annotated[str, typer.Argument(metavar="SITE", help="Site of the host.")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="Host name.")],
    switches: Annotated[
        list[str] | None,
        typer.Option("--switch", metavar="NAME", help="A virtual switch (repeatable)."),
    ] = None,
    kind: Annotated[
        str | None,
        typer.Option("--kind", metavar="KIND", help="Hypervisor kind (default: the provider's)."),
    ] = None,
    connected: Annotated[
        bool, typer.Option("--connected/--disconnected", help="Whether the host is reachable.")
    ] = True,
    uri: Annotated[
        str | None,
        typer.Option(
            "--uri",
            metavar="URI",
            help="libvirt URI of a kvm host (qemu:///system, qemu+ssh://HOST/system).",
        ),
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a hypervisor host to a site (a kvm host: its switches come from libvirt)."""
    body = {
        "site": site,
        "name": name,
        "switches": switches,
        "kind": kind,
        "connected": connected,
        "uri": uri,
    }
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.post("/hosts", body), render.host)


@host_app.command("set")
def host_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Host name.")],
    connected: Annotated[
        bool | None,
        typer.Option("--connected/--disconnected", help="Whether the host is reachable."),
    ] = None,
    add: Annotated[
        list[str] | None,
        typer.Option("--switch", metavar="NAME", help="Add a virtual switch (repeatable)."),
    ] = None,
    remove: Annotated[
        list[str] | None,
        typer.Option(
            "--remove-switch", metavar="NAME", help="Remove a virtual switch (repeatable)."
        ),
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Mark a host connected or disconnected; add or remove its virtual switches."""
    body = {"connected": connected, "add_switches": add or [], "remove_switches": remove or []}
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.request("PATCH", f"/hosts/{segment(name)}", body=body)
        session.emit(answer, render.host)


@host_app.command("list")
def host_list(
    ctx: typer.Context, site: SiteOpt = None, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """List the hosts."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get("/hosts", site=site), render.hosts)


@vm_app.command("create")
def vm_create(
    ctx: typer.Context,
    name: NameArg,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Host to create it on.")],
    disks: Annotated[
        list[str] | None,
        typer.Option("--disk", metavar="SIZE", help="A disk, e.g. 1G (repeatable)."),
    ] = None,
    os: Annotated[
        str | None, typer.Option("--os", metavar="linux|windows", help="Guest OS (default linux).")
    ] = None,
    switch: Annotated[
        str | None, typer.Option("--switch", metavar="NAME", help="Switch of its NIC.")
    ] = None,
    workload: Annotated[
        bool,
        typer.Option("--workload/--no-workload", help="Run the lab's guest workload in it."),
    ] = True,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a VM (started) on a host."""
    body = {
        "name": name,
        "host": host,
        "disks": disks,
        "os": os,
        "switch": switch,
        "workload": workload,
    }
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.post("/vms", body, read_timeout=NO_TIMEOUT), render.vm)


@vm_app.command("list")
def vm_list(
    ctx: typer.Context,
    site: SiteOpt = None,
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            metavar="HOST",
            help="Only this host's VMs; a kvm host also lists its domains not yet managed.",
        ),
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the VMs with their power state."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get("/vms", site=site, host=host), render.vms)


@vm_app.command("import")
def vm_import(
    ctx: typer.Context,
    name: NameArg,
    host: Annotated[str, typer.Option("--host", metavar="HOST", help="Host that will run it.")],
    disks: Annotated[
        list[str],
        typer.Option(
            "--disk",
            metavar="FILE",
            help="An image at the host's site: .vhdx, .vhd, .vmdk, .qcow2 or raw (repeatable).",
        ),
    ],
    switch: Annotated[
        str | None, typer.Option("--switch", metavar="NAME", help="Its NIC's switch.")
    ] = None,
    cpus: Annotated[int, typer.Option("--cpus", help="vCPUs.")] = 1,
    memory: Annotated[int, typer.Option("--memory-mib", help="Memory in MiB.")] = 512,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Make a VM of a Hyper-V or VMware VM's disks (converted with qemu-img)."""
    body = {"name": name, "host": host, "disks": disks, "switch": switch, "cpus": cpus,
            "memory_mib": memory}  # fmt: skip
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.post("/vms/import", body), render.vm)


@vm_app.command("adopt")
def vm_adopt(
    ctx: typer.Context,
    name: NameArg,
    host: Annotated[
        str | None,
        typer.Option("--host", metavar="HOST", help="The kvm host of the domain (if several)."),
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Take in a domain defined on a kvm host (its disks stay where they are);
    `protect NAME` does it too when no VM has that name."""
    with Session.of(ctx, vault, json_out) as session:
        path = f"/vms/{segment(name)}/adopt"
        answer = session.client.request("POST", path, params={"host": host} if host else None)
        session.emit(answer, render.vm)


@vm_app.command("show")
def vm_show(
    ctx: typer.Context,
    name: NameArg,
    site: SiteOpt = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a VM (--site picks one when several sites hold that name)."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get(f"/vms/{segment(name)}", site=site), render.vm)


@vm_app.command("start")
def vm_start(
    ctx: typer.Context,
    name: NameArg,
    site: SiteOpt = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Start a VM."""
    _power(ctx, "start", name, site, vault, json_out)


@vm_app.command("stop")
def vm_stop(
    ctx: typer.Context,
    name: NameArg,
    site: SiteOpt = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Stop a VM."""
    _power(ctx, "stop", name, site, vault, json_out)


def _power(
    ctx: typer.Context, verb: str, name: str, site: str | None, vault: Path | None, json_out: bool
) -> None:
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.post(
            f"/vms/{segment(name)}/{verb}", read_timeout=NO_TIMEOUT, site=site
        )
        session.emit(answer, render.vm)


@vm_app.command("delete")
def vm_delete(
    ctx: typer.Context,
    name: NameArg,
    site: SiteOpt = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Stop and delete a VM with its disks."""
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.request(
            "DELETE", f"/vms/{segment(name)}", params={"site": site}, read_timeout=NO_TIMEOUT
        )
        session.emit(answer, lambda doc: render.say(f"deleted {doc['deleted']}"))


@vm_app.command("check")
def vm_check(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="VM...", help="One VM, or several.")],
    site: SiteOpt = None,
    point: Annotated[
        list[str] | None,
        typer.Option(
            "--point", metavar="ID", help="Check this recovery point instead (once per VM)."
        ),
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Check the guest data of VMs (or recovery points); with several VMs, also that no
    record of one depends on a record another lacks. Exit 1 if inconsistent."""
    with Session.of(ctx, vault, json_out) as session:
        if len(names) == 1 and len(point or []) <= 1:
            report = session.client.get(
                f"/vms/{segment(names[0])}/check",
                read_timeout=NO_TIMEOUT, site=site, point=point[0] if point else None,
            )  # fmt: skip
            session.emit(report, render.check)
        else:
            report = session.client.get(
                "/checks", read_timeout=NO_TIMEOUT, vm=names, site=site, point=point
            )
            session.emit(report, render.checks)
    if report.get("consistent") is not True:
        raise typer.Exit(1)
