"""Commands ``group ...`` (replication groups) and ``plan ...`` (recovery plans)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.text import Text

from siterecovery.cli import render
from siterecovery.cli.client import NO_TIMEOUT, segment
from siterecovery.cli.failover_cmd import DryRunOpt, WaitOpt
from siterecovery.cli.jobs_cmd import started
from siterecovery.cli.session import JsonOpt, Session, VaultOpt

group_app = typer.Typer(
    help="Replication groups: VMs whose common points are taken at one instant.",
    no_args_is_help=True,
)
plan_app = typer.Typer(
    help="Recovery plans: fail many VMs over and back, in boot-group order.",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Group or plan name.")]
VmsArg = Annotated[list[str], typer.Argument(metavar="VM...", help="VM names.")]
BootGroupOpt = Annotated[
    int, typer.Option("--group", metavar="N", help="Boot group (1 starts first; N+1 adds one).")
]

GROUP_COLUMNS: list[render.Column] = [
    ("NAME", render.key("name")),
    ("MEMBERS", render.key("members")),
    ("DIRECTION", render.key("direction")),
    ("EVERY", render.key("common_interval", render.human_seconds)),
    ("LATEST COMMON", lambda d: render.brief((d.get("latest_common") or {}).get("common"))),
    (
        "LATEST COMMON APP",
        lambda d: render.brief((d.get("latest_common_app_consistent") or {}).get("common")),
    ),
]
PLAN_COLUMNS: list[render.Column] = [
    ("NAME", render.key("name")),
    ("BOOT GROUPS", lambda d: str(len(d.get("groups") or []))),
    ("VMS", render.key("vms")),
    ("DESCRIPTION", render.key("description")),
]
MEMBER_COLUMNS: list[render.Column] = [
    ("GROUP", render.key("group")),
    ("VM", render.key("vm")),
    ("STATE", render.key("state")),
    ("DIRECTION", render.key("direction")),
    ("REPLICATION GROUP", render.key("replication_group")),
    ("LATEST POINT", render.key("latest_point")),
]


_groups = render.lister(GROUP_COLUMNS, "Replication groups", "no groups")


def _plan_view(doc: Any) -> None:
    rows = [{**m, "group": g["index"]} for g in doc.get("groups", []) for m in g["members"]]
    actions = [
        {"group": g["index"], **a} for g in doc.get("groups", []) for a in g.get("actions", [])
    ]
    parts: list[Any] = [render.table(rows, MEMBER_COLUMNS, title=f"plan {doc.get('name')}")]
    if actions:
        columns: list[render.Column] = [
            ("GROUP", render.key("group")),
            ("ACTION", render.key("name")),
            ("KIND", render.key("kind")),
            ("WHEN", render.key("when")),
            ("COMMAND / INSTRUCTIONS", lambda a: a.get("command") or a.get("instructions") or ""),
        ]
        parts.append(render.table(actions, columns, title="Actions"))
    render.print_all(*parts)


def _dry_run(doc: Any) -> None:
    rows = [
        {
            "group": g["group"],
            "vm": vm["vm"],
            "kind": vm.get("kind"),
            "point": ((vm["plan"].get("point") or {}).get("id")),
            "bytes": vm["plan"].get("bytes_to_move"),
            "refused": "; ".join(
                f"{c['code']}: {c['message']}" for c in vm["plan"]["failed_preconditions"]
            ),
        }
        for g in doc.get("order", [])
        for vm in g["vms"]
    ]
    columns: list[render.Column] = [
        ("ORDER", render.key("group")),
        ("VM", render.key("vm")),
        ("JOB", render.key("kind")),
        ("POINT", render.key("point")),
        ("BYTES TO MOVE", render.key("bytes", render.human_bytes)),
        ("REFUSED BY", render.key("refused")),
    ]
    checks = [c for c in doc.get("checks", []) if not c["ok"]]
    title = f"dry run: {doc.get('operation')} of plan {doc.get('plan')}"
    parts: list[Any] = [render.table(rows, columns, title=title)]
    for failed in checks:
        parts.append(Text(f"{failed['code']}: {failed['message']}", style="red"))
    verdict = "would run" if doc.get("ok") else "would be refused"
    parts.append(Text(verdict, style="green" if doc.get("ok") else "red"))
    render.print_all(*parts)


# Groups ---------------------------------------------------------------------------


@group_app.command("create")
def group_create(
    ctx: typer.Context,
    name: NameArg,
    vms: Annotated[str, typer.Option("--vms", metavar="VM,VM", help="Members, comma-separated.")],
    every: Annotated[
        float,
        typer.Option("--every", metavar="S", help="Seconds between common points (0: on demand)."),
    ] = 300.0,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a replication group of protected VMs."""
    body = {"name": name, "vms": _split(vms), "common_interval": every}
    with Session.of(ctx, vault, json_out) as session:
        doc = session.client.post("/groups", body)
        session.emit(doc, lambda d: render.say(f"group {d['name']}: {', '.join(d['members'])}"))


@group_app.command("add")
def group_add(
    ctx: typer.Context,
    name: NameArg,
    vms: VmsArg,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add VMs to a group."""
    _group_change(ctx, name, "members", vms, vault, json_out)


@group_app.command("remove")
def group_remove(
    ctx: typer.Context,
    name: NameArg,
    vms: VmsArg,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove VMs from a group."""
    _group_change(ctx, name, "remove", vms, vault, json_out)


def _group_change(
    ctx: typer.Context, name: str, path: str, vms: list[str], vault: Any, json_out: bool
) -> None:
    with Session.of(ctx, vault, json_out) as session:
        doc = session.client.post(f"/groups/{segment(name)}/{path}", {"vms": vms})
        session.emit(doc, lambda group: _groups([group]))


@group_app.command("list")
def group_list(ctx: typer.Context, vault: VaultOpt = None, json_out: JsonOpt = False) -> None:
    """List the replication groups with their latest common points."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get("/groups"), _groups)


@group_app.command("show")
def group_show(
    ctx: typer.Context, name: NameArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """Show a group and its latest common points."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get(f"/groups/{segment(name)}"), render.everything)


@group_app.command("delete")
def group_delete(
    ctx: typer.Context, name: NameArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """Delete a group (its members stay protected, each on its own)."""
    with Session.of(ctx, vault, json_out) as session:
        doc = session.client.request("DELETE", f"/groups/{segment(name)}")
        session.emit(doc, lambda d: render.say(f"deleted group {d['deleted']}"))


@group_app.command("point")
def group_point(
    ctx: typer.Context, name: NameArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """Take a common point of every member now."""
    with Session.of(ctx, vault, json_out) as session:
        doc = session.client.post(f"/groups/{segment(name)}/point", read_timeout=NO_TIMEOUT)
        session.emit(doc, render.everything)


# Plans ----------------------------------------------------------------------------


@plan_app.command("create")
def plan_create(
    ctx: typer.Context,
    name: NameArg,
    description: Annotated[str, typer.Option("--description", help="What the plan recovers.")] = "",
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create an empty recovery plan."""
    with Session.of(ctx, vault, json_out) as session:
        doc = session.client.post("/plans", {"name": name, "description": description})
        session.emit(doc, lambda d: render.say(f"plan {d['name']} created"))


@plan_app.command("add")
def plan_add(
    ctx: typer.Context,
    name: NameArg,
    vms: VmsArg,
    group: BootGroupOpt = 1,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add VMs to a boot group of the plan."""
    with Session.of(ctx, vault, json_out) as session:
        doc = session.client.post(f"/plans/{segment(name)}/vms", {"group": group, "vms": vms})
        session.emit(doc, _plan_view)


@plan_app.command("remove")
def plan_remove(
    ctx: typer.Context,
    name: NameArg,
    vm: Annotated[str, typer.Argument(metavar="VM")],
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove a VM from the plan."""
    with Session.of(ctx, vault, json_out) as session:
        doc = session.client.request("DELETE", f"/plans/{segment(name)}/vms/{segment(vm)}")
        session.emit(doc, _plan_view)


@plan_app.command("action")
def plan_action(
    ctx: typer.Context,
    name: NameArg,
    action: Annotated[str, typer.Argument(metavar="ACTION", help="Action name.")],
    group: BootGroupOpt = 1,
    when: Annotated[str, typer.Option("--when", metavar="before|after")] = "before",
    script: Annotated[
        str | None, typer.Option("--script", metavar="COMMAND", help="Run this (sh -c).")
    ] = None,
    manual: Annotated[
        str | None,
        typer.Option("--manual", metavar="TEXT", help="Pause the job with these instructions."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", metavar="S")] = 300.0,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a script or manual action before or after a boot group."""
    body = {
        "group": group,
        "name": action,
        "kind": "manual" if manual is not None else "script",
        "when": when,
        "command": script,
        "instructions": manual,
        "timeout": timeout,
    }
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.post(f"/plans/{segment(name)}/actions", body), _plan_view)


@plan_app.command("list")
def plan_list(ctx: typer.Context, vault: VaultOpt = None, json_out: JsonOpt = False) -> None:
    """List the recovery plans."""
    with Session.of(ctx, vault, json_out) as session:
        docs = session.client.get("/plans")
        session.emit(docs, render.lister(PLAN_COLUMNS, "Recovery plans", "no plans"))


@plan_app.command("show")
def plan_show(
    ctx: typer.Context, name: NameArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """Show a plan: boot groups, VM states, actions."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get(f"/plans/{segment(name)}"), _plan_view)


@plan_app.command("delete")
def plan_delete(
    ctx: typer.Context, name: NameArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """Delete a plan (its VMs are not touched)."""
    with Session.of(ctx, vault, json_out) as session:
        doc = session.client.request("DELETE", f"/plans/{segment(name)}")
        session.emit(doc, lambda d: render.say(f"deleted plan {d['deleted']}"))


@plan_app.command("failover")
def plan_failover(
    ctx: typer.Context,
    name: NameArg,
    type_: Annotated[str, typer.Option("--type", metavar="test|planned|unplanned")],
    point: Annotated[
        str,
        typer.Option(
            "--point",
            metavar="latest|latest-processed|latest-app-consistent",
            help="latest: each VM its own latest point; latest-app-consistent: a replication "
            "group its latest common app-consistent point.",
        ),
    ] = "latest",
    sync: Annotated[str, typer.Option("--sync", metavar="delta|full")] = "delta",
    threads: Annotated[int | None, typer.Option("--threads", metavar="N")] = None,
    create_vm: Annotated[bool, typer.Option("--create-vm")] = False,
    dry_run: DryRunOpt = False,
    wait: WaitOpt = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fail every VM of the plan over (planned on committed VMs: fail them back home)."""
    body = {
        "type": type_,
        "point": point,
        "sync": sync,
        "threads": threads,
        "create_vm": create_vm,
        "dry_run": dry_run,
    }
    _operation(ctx, name, "failover", body, wait=wait, vault=vault, json_out=json_out)


def _plan_operation(operation: str, summary: str) -> None:
    """Register ``plan OPERATION NAME [--dry-run] [--wait]``."""

    def command(
        ctx: typer.Context,
        name: NameArg,
        dry_run: DryRunOpt = False,
        wait: WaitOpt = False,
        vault: VaultOpt = None,
        json_out: JsonOpt = False,
    ) -> None:
        body = {"dry_run": dry_run}
        _operation(ctx, name, operation, body, wait=wait, vault=vault, json_out=json_out)

    command.__doc__ = summary
    plan_app.command(operation)(command)


_plan_operation("commit", "Commit the failover of every VM of the plan.")
_plan_operation("reprotect", "Reverse-replicate every VM of the plan.")
_plan_operation("cleanup-test", "Remove the copies a plan's test failover started.")


def _operation(
    ctx: typer.Context,
    name: str,
    operation: str,
    body: dict[str, Any],
    *,
    wait: bool,
    vault: Any,
    json_out: bool,
) -> None:
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.post(f"/plans/{segment(name)}/{operation}", body)
        if answer.get("dry_run"):
            session.emit_plan(answer, _dry_run)
            return
        started(session, answer, wait=wait)


def _split(vms: str) -> list[str]:
    return [vm.strip() for vm in vms.split(",") if vm.strip()]
