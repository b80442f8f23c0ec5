"""``siterecovery key create NAME`` and ``key list``: encryption keys in the vault.

Only names, dates and fingerprints are ever printed: the material stays in
the vault, where ``sync --key NAME --vault DIR`` reads it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from siterecovery.cli import render
from siterecovery.cli.session import JsonOpt, Session, VaultOpt

app = typer.Typer(help="Create and list encryption keys.", no_args_is_help=True)

COLUMNS: list[render.Column] = [
    ("NAME", lambda k: str(k["name"])),
    ("CREATED", lambda k: str(k["created"])),
    ("FINGERPRINT", lambda k: str(k["fingerprint"])),
]


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Key name.")],
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create a random AES-256 key named NAME in the vault."""
    with Session.of(ctx, vault, json_out) as session:
        doc = session.client.post("/keys", {"name": name})
        session.emit(doc, lambda k: render.say(f"key {k['name']} created ({k['fingerprint']})"))


@app.command("list")
def list_keys(ctx: typer.Context, vault: VaultOpt = None, json_out: JsonOpt = False) -> None:
    """List the keys: name, date, fingerprint."""
    with Session.of(ctx, vault, json_out) as session:
        keys = session.client.get("/keys")
        empty = "no keys; `siterecovery key create NAME` makes one"
        session.emit(keys, render.lister(COLUMNS, "keys", empty))
