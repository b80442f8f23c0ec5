"""The two local commands, ``init`` and ``serve``: they act on the vault
directory in this process instead of asking a daemon."""

from __future__ import annotations

from typing import Annotated

import typer

from siterecovery.cli import render
from siterecovery.cli.session import JsonOpt, Session, VaultOpt


def init(
    ctx: typer.Context,
    db_url: Annotated[
        str | None,
        typer.Option(
            "--db-url", metavar="URL", help="SQLAlchemy URL of the vault database (default SQLite)."
        ),
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create (or upgrade) the vault directory: database, API token. Idempotent."""
    from siterecovery.daemon import init_vault

    session = Session.of(ctx, vault, json_out)
    session.emit(init_vault(session.vault, db_url=db_url), render.everything)


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port).")] = 0,
    lab: Annotated[bool, typer.Option("--lab", help="Bring the lab up first.")] = False,
    lab_provider: Annotated[
        str,
        typer.Option(
            "--lab-provider",
            metavar="local|libvirt",
            envvar="SITERECOVERY_LAB_PROVIDER",
            help="The lab's hosts: local (storage daemons) or libvirt (private libvirtds "
            "with real Linux guests; root).",
        ),
    ] = "local",
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the daemon (API, jobs, replication) until Ctrl-C or SIGTERM.

    It writes VAULT/daemon.json, where the other commands find it.
    """
    from siterecovery.daemon import serve as serve_vault

    session = Session.of(ctx, vault, json_out)
    serve_vault(session.vault, host=host, port=port, lab=lab, lab_provider=lab_provider)
    session.emit({"vault": str(session.vault), "state": "stopped"}, _stopped)


def _stopped(doc: render.Doc) -> None:
    render.say(f"daemon of {doc['vault']} stopped")
