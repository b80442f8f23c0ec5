"""What every command shares: the global options and one invocation's session.

``--vault`` and ``--json`` are accepted before the subcommand (options of the
root callback, kept in ``ctx.obj``) and after it (options of every command,
through the ``VaultOpt`` and ``JsonOpt`` types); the command's own value wins.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from siterecovery.cli import render
from siterecovery.domain.errors import InvalidInput

if TYPE_CHECKING:
    from siterecovery.cli.client import Client
    from siterecovery.store.repo import VaultStore

VAULT_ENV = "SITERECOVERY_VAULT"
DEFAULT_VAULT = Path("siterecovery-vault")

VaultOpt = Annotated[
    Path | None,
    typer.Option(
        "--vault",
        metavar="DIR",
        show_default=False,
        help=f"Vault directory (default: ${VAULT_ENV}, else ./{DEFAULT_VAULT}).",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="Print exactly one JSON document on stdout."),
]
SiteOpt = Annotated[str | None, typer.Option("--site", metavar="SITE", help="Only this site.")]


@dataclass(frozen=True, slots=True)
class Globals:
    """The options given before the subcommand."""

    vault: Path | None = None
    json: bool = False


def resolve_vault(given: Path | None) -> Path:
    """``--vault``, else ``$SITERECOVERY_VAULT``, else ``./siterecovery-vault``."""
    if given is not None:
        return given
    return Path(os.environ.get(VAULT_ENV) or DEFAULT_VAULT)


class Session:
    """One command invocation: its options, the daemon client (opened on first
    use) and the output. A context manager that closes the client."""

    def __init__(self, *, vault: Path, json: bool) -> None:
        self.vault = vault
        self.json = json
        self._client: Client | None = None

    @classmethod
    def of(cls, ctx: typer.Context, vault: Path | None, json: bool) -> Session:
        """The session of a command, merging its options with the root's."""
        root = ctx.find_root().obj
        globals_ = root if isinstance(root, Globals) else Globals()
        return cls(vault=resolve_vault(vault or globals_.vault), json=json or globals_.json)

    @property
    def client(self) -> Client:
        if self._client is None:
            # Imported here: commands without a daemon (sync) never load httpx.
            from siterecovery.cli.client import Client

            self._client = Client.of_vault(self.vault)
        return self._client

    def emit(self, doc: Any, human: Callable[[Any], None]) -> None:
        """Print ``doc`` as JSON with --json, else through ``human``."""
        if self.json:
            render.print_json(doc)
        else:
            human(doc)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._client is not None:
            self._client.close()


@contextmanager
def vault_store(vault: Path) -> Iterator[VaultStore]:
    """The vault's database opened in this process, for the commands that need no
    daemon (sync and key files: key material never crosses the API)."""
    from siterecovery.daemon import vault_url
    from siterecovery.store.repo import VaultStore

    if not (vault / "config.json").exists():
        raise InvalidInput(field="vault", reason=f"no vault at {vault} (see `siterecovery init`)")
    store = VaultStore(vault_url(vault))
    try:
        yield store
    finally:
        store.close()
