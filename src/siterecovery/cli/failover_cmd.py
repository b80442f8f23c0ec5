"""Commands of recovery: ``failover``, ``complete``, ``commit``, ``reprotect``,
``cleanup-test`` and ``verify``.

Job-starting commands print the job (``--wait`` follows it with a progress
bar; a delta failback stops following at ``awaiting-completion``, where
``complete JOB`` takes over). ``--dry-run`` prints the plan and starts nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from siterecovery.cli import render
from siterecovery.cli.client import NO_TIMEOUT, segment
from siterecovery.cli.jobs_cmd import follow, started
from siterecovery.cli.session import JsonOpt, Session, VaultOpt

VmArg = Annotated[str, typer.Argument(metavar="VM", help="VM name.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Print the plan and its preconditions; change nothing.")
]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Follow the job.")]


def failover(
    ctx: typer.Context,
    vm: VmArg,
    type_: Annotated[
        str, typer.Option("--type", metavar="test|planned|unplanned", help="Failover type.")
    ],
    point: Annotated[
        str,
        typer.Option(
            "--point",
            metavar="latest|latest-processed|latest-app-consistent|ID",
            help="Recovery point (unplanned and test failovers).",
        ),
    ] = "latest",
    sync: Annotated[
        str,
        typer.Option(
            "--sync",
            metavar="delta|full",
            help="Failback data sync: delta = synchronise before failover (two phases), "
            "full = synchronise during failover only.",
        ),
    ] = "delta",
    host: Annotated[
        str | None, typer.Option("--host", metavar="HOST", help="Alternate location: this host.")
    ] = None,
    create_vm: Annotated[
        bool, typer.Option("--create-vm", help="Create the VM on --host if it does not exist.")
    ] = False,
    switch: Annotated[
        str | None,
        typer.Option("--switch", metavar="NAME", help="Isolated switch of a test failover."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", metavar="N", help="Download threads.")
    ] = None,
    key: Annotated[
        str | None, typer.Option("--key", metavar="NAME", help="Key of encrypted data.")
    ] = None,
    dry_run: DryRunOpt = False,
    wait: WaitOpt = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Fail a VM over to the other site (a planned failover toward home is a failback)."""
    body = {
        "type": type_,
        "point": point,
        "sync": sync,
        "host": host,
        "create_vm": create_vm,
        "switch": switch,
        "threads": threads,
        "key": key,
        "dry_run": dry_run,
    }
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.post(f"/items/{segment(vm)}/failover", body)
        _started_or_plan(session, answer, wait=wait)


def _started_or_plan(session: Session, answer: dict[str, Any], *, wait: bool) -> None:
    if answer.get("dry_run"):
        session.emit_plan(answer, render.everything)
        return
    started(session, answer, wait=wait)


def complete(
    ctx: typer.Context,
    job_id: Annotated[
        str, typer.Argument(metavar="JOB|VM", help="The waiting job's id, or its VM's name.")
    ],
    wait: WaitOpt = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Complete a failback waiting in awaiting-completion: phase 2 starts."""
    with Session.of(ctx, vault, json_out) as session:
        job = session.client.post(f"/jobs/{segment(job_id)}/complete")
        if wait:
            follow(session, job["id"])
            return
        session.emit(job, render.job)


def commit(
    ctx: typer.Context,
    vm: VmArg,
    dry_run: DryRunOpt = False,
    wait: WaitOpt = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Commit a failover (after a failback: delete the VM left at the other site)."""
    _item_action(ctx, "commit", vm, dry_run=dry_run, wait=wait, vault=vault, json_out=json_out)


def reprotect(
    ctx: typer.Context,
    vm: VmArg,
    dry_run: DryRunOpt = False,
    wait: WaitOpt = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Reprotect (reverse replicate): replicate from where the VM runs to the other site."""
    _item_action(ctx, "reprotect", vm, dry_run=dry_run, wait=wait, vault=vault, json_out=json_out)


def _item_action(
    ctx: typer.Context,
    action: str,
    vm: str,
    *,
    dry_run: bool,
    wait: bool,
    vault: Path | None,
    json_out: bool,
) -> None:
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.post(f"/items/{segment(vm)}/{action}", {"dry_run": dry_run})
        _started_or_plan(session, answer, wait=wait)


def cleanup_test(
    ctx: typer.Context,
    vm: VmArg,
    wait: WaitOpt = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove the copy a test failover started."""
    with Session.of(ctx, vault, json_out) as session:
        started(session, session.client.post(f"/items/{segment(vm)}/cleanup-test"), wait=wait)


def verify(
    ctx: typer.Context, vm: VmArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """Compare the item's disks across both sites, block by block (digests only move)."""
    with Session.of(ctx, vault, json_out) as session:
        report = session.client.get(f"/items/{segment(vm)}/verify", read_timeout=NO_TIMEOUT)
        session.emit(report, render.everything)
        if not report.get("equal"):
            raise typer.Exit(1)
