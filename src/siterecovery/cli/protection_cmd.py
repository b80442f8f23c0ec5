"""Commands of protection: ``protect``, ``replicate``, ``items``, ``item show``,
``item set``, ``disable`` and ``points``.

Option values go to the daemon as given (a negative ``--threads`` included):
the daemon validates them and refuses bad ones with ``INVALID_INPUT`` (exit 2),
exactly as it refuses them from any other API client. Options not given are
left out of the request so the daemon's defaults apply.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from siterecovery.cli import render
from siterecovery.cli.client import NO_TIMEOUT, segment
from siterecovery.cli.jobs_cmd import started
from siterecovery.cli.session import JsonOpt, Session, VaultOpt

VmArg = Annotated[str, typer.Argument(metavar="VM", help="VM name.")]

item_app = typer.Typer(help="Show a replicated item or change its policy.", no_args_is_help=True)


IntervalOpt = Annotated[
    str | None,
    typer.Option(
        "--interval", metavar="DURATION", help="Crash-consistent point interval (default 30s)."
    ),
]
AppEveryOpt = Annotated[
    int | None,
    typer.Option(
        "--app-consistent-every",
        metavar="N",
        help="Every Nth point is app-consistent (default 0: never).",
    ),
]
RetentionOpt = Annotated[
    str | None,
    typer.Option("--retention", metavar="DURATION", help="Keep points this long (default 24h)."),
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", metavar="N", help="Copy threads (default 4).")
]
MaxRateOpt = Annotated[
    str | None,
    typer.Option(
        "--max-rate",
        metavar="RATE",
        help="Bytes/s cap of this item's transfers, e.g. 50M (default 0: no cap; "
        "the site's own cap, `site set --max-rate`, applies too).",
    ),
]
CompressOpt = Annotated[
    str | None,
    typer.Option(
        "--compress",
        metavar="zstd|none",
        help="Compress the data on the wire between sites (default none).",
    ),
]
KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        metavar="NAME",
        help="A vault key (`key create`) sealing the transfers between sites in flight, "
        "on top of TLS; the replicas at rest are not encrypted by it.",
    ),
]


def _policy(
    interval: str | None,
    app_consistent_every: int | None,
    retention: str | None,
    threads: int | None,
    max_rate: str | None,
    verify_points: bool | None,
    compress: str | None = None,
    key: str | None = None,
) -> dict[str, object]:
    """The policy fields of a request body (None: left out, the daemon decides)."""
    return {
        "interval": interval,
        "app_consistent_every": app_consistent_every,
        "retention": retention,
        "threads": threads,
        "max_rate": max_rate,
        "verify_points": verify_points,
        "compress": compress,
        "key": key,
    }


def protect(
    ctx: typer.Context,
    vm: VmArg,
    to: Annotated[str, typer.Option("--to", metavar="SITE", help="Recovery site.")],
    interval: IntervalOpt = None,
    app_consistent_every: AppEveryOpt = None,
    retention: RetentionOpt = None,
    threads: ThreadsOpt = None,
    max_rate: MaxRateOpt = None,
    verify_points: Annotated[
        bool, typer.Option("--verify-points", help="Check each point's digests after sealing.")
    ] = False,
    compress: CompressOpt = None,
    key: KeyOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the enable job to its end.")] = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Protect a VM: replicate its disks to another site and keep recovery points."""
    policy = _policy(
        interval, app_consistent_every, retention, threads, max_rate, verify_points, compress, key
    )
    body = {"vm": vm, "to": to, **policy}
    with Session.of(ctx, vault, json_out) as session:
        started(session, session.client.post("/items", body), wait=wait)


@item_app.command("set")
def set_policy(
    ctx: typer.Context,
    vm: VmArg,
    interval: IntervalOpt = None,
    app_consistent_every: AppEveryOpt = None,
    retention: RetentionOpt = None,
    threads: ThreadsOpt = None,
    max_rate: MaxRateOpt = None,
    verify_points: Annotated[
        bool | None,
        typer.Option("--verify-points/--no-verify-points", help="Check digests of each point."),
    ] = None,
    compress: CompressOpt = None,
    key: KeyOpt = None,
    no_key: Annotated[
        bool, typer.Option("--no-key", help="Transfers go under TLS only, without a key.")
    ] = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Change the replication policy of a protected VM (options not given are kept)."""
    if no_key and key is not None:
        raise typer.BadParameter("give --key NAME or --no-key, not both", param_hint="--no-key")
    body = _policy(
        interval, app_consistent_every, retention, threads, max_rate, verify_points, compress,
        "" if no_key else key,
    )  # fmt: skip
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.request("PATCH", f"/items/{segment(vm)}", body=body)
        session.emit(answer, render.item)


def replicate(
    ctx: typer.Context,
    vm: VmArg,
    app_consistent: Annotated[
        bool | None,
        typer.Option(
            "--app-consistent/--crash-consistent",
            help="Quiesce the guest for this point, or not (default: as the policy says).",
        ),
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Replicate a protected VM once now and seal a recovery point (synchronous)."""
    with Session.of(ctx, vault, json_out) as session:
        report = session.client.post(
            f"/items/{segment(vm)}/replicate",
            {"app_consistent": app_consistent},
            read_timeout=NO_TIMEOUT,
        )
        session.emit(report, render.pass_report)


def list_items(ctx: typer.Context, vault: VaultOpt = None, json_out: JsonOpt = False) -> None:
    """List the replicated items with their state, health and RPO."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get("/items"), render.items)


@item_app.command("show")
def show_item(
    ctx: typer.Context, vm: VmArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """Show a replicated item: state, health, RPO, points, policy, allowed operations."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get(f"/items/{segment(vm)}"), render.item)


def disable(
    ctx: typer.Context,
    vm: VmArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be deleted; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Stop protecting a VM; its replica disks and recovery points are deleted.

    On a terminal it lists what it deletes and asks first (``--yes``: do not ask)."""
    path = f"/items/{segment(vm)}/disable"
    with Session.of(ctx, vault, json_out) as session:
        if dry_run:
            session.emit_plan(session.client.post(path, {"dry_run": True}), render.everything)
            return
        if not yes and not json_out and sys.stdin.isatty():
            plan = session.client.post(path, {"dry_run": True})
            if plan.get("ok", True):  # a refusal is the real call's to say
                render.everything(plan)
                question = f"Disable protection of {vm} and delete what is listed above?"
                if not typer.confirm(question):
                    render.say("nothing changed")
                    raise typer.Exit(1)
        session.emit(session.client.post(path), render.item)


def list_points(
    ctx: typer.Context, vm: VmArg, vault: VaultOpt = None, json_out: JsonOpt = False
) -> None:
    """List the retained recovery points of a protected VM, oldest first."""
    with Session.of(ctx, vault, json_out) as session:
        session.emit(session.client.get(f"/items/{segment(vm)}/points"), render.points)


point_app = typer.Typer(help="Export a recovery point.", no_args_is_help=True)


@point_app.command("export")
def export_point(
    ctx: typer.Context,
    vm: VmArg,
    point: Annotated[str, typer.Argument(metavar="POINT", help="Point id (`points VM`).")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="FORMAT",
            help="raw, qcow2, vhdx, vpc (VHD), vmdk or vmdk-stream (streamOptimized).",
        ),
    ],
    to: Annotated[
        str, typer.Option("--to", metavar="FILE", help="A new file at the point's site.")
    ],
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a recovery point's disks in another hypervisor's format."""
    body = {"format": fmt, "to": to}
    with Session.of(ctx, vault, json_out) as session:
        answer = session.client.post(f"/items/{segment(vm)}/points/{segment(point)}/export", body)
        session.emit(answer, render.exported)
