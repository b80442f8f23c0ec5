"""``siterecovery key create|list|export|import|rotate-master``: encryption keys in the vault.

Only names, dates and fingerprints are ever printed: the material stays in
the vault, where ``sync --key NAME --vault DIR`` reads it, or goes to a key
file (mode 0600) that ``key import`` adds to the vault of the other site.
Export, import and ``rotate-master`` work on the vault directly (no daemon),
like ``sync``: they need the vault directory, which holds the master key. A
running daemon reads the master key files on every use, so it keeps working
through a rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from siterecovery.cli import render
from siterecovery.cli.common import vault_store
from siterecovery.cli.session import JsonOpt, Session, VaultOpt

if TYPE_CHECKING:
    from siterecovery.keys.master import MasterKey
    from siterecovery.store.repo import VaultStore

app = typer.Typer(help="Create, list, export and import encryption keys.", no_args_is_help=True)

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


@app.command("export")
def export(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Key name.")],
    to: Annotated[Path, typer.Option("--to", metavar="FILE", help="New key file (0600).")],
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write key NAME to a new file only you can read, for the other site's vault."""
    from siterecovery.services.keys import export_key

    _direct(ctx, vault, json_out,
            lambda store, master: export_key(store, master=master, name=name, path=to),
            lambda k: f"key {k['name']} ({k['fingerprint']}) written to {k['file']}")  # fmt: skip


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A file from `key export`.")],
    name: Annotated[
        str | None, typer.Option("--name", metavar="NAME", help="Store it under this name.")
    ] = None,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add the key of a key file to this vault (the same key twice is a no-op)."""
    from siterecovery.services.keys import import_key

    _direct(ctx, vault, json_out,
            lambda store, master: import_key(store, master=master, path=file, name=name),
            lambda k: f"key {k['name']} imported ({k['fingerprint']})")  # fmt: skip


@app.command("rotate-master")
def rotate_master_(ctx: typer.Context, vault: VaultOpt = None, json_out: JsonOpt = False) -> None:
    """Replace the vault master key (VAULT/master.key) and re-wrap every key under it.

    Safe to interrupt: every key stays readable, and running it again finishes."""
    from siterecovery.services.keys import rotate_master

    _direct(ctx, vault, json_out, lambda store, master: rotate_master(store, master=master),
            lambda r: f"master key {r['master']} now wraps {r['keys']} key(s)")  # fmt: skip


def _direct(
    ctx: typer.Context,
    vault: Path | None,
    json_out: bool,
    body: Callable[[VaultStore, MasterKey], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
) -> None:
    from siterecovery.keys.master import MasterKey

    with Session.of(ctx, vault, json_out) as session, vault_store(session.vault) as store:
        doc = body(store, MasterKey(session.vault))
        session.emit(doc, lambda k: render.say(summary(k)))
