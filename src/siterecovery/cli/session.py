"""What every command shares: the global options and one invocation's session.

``--vault`` and ``--json`` are accepted before the subcommand (options of the
root callback, kept in ``ctx.obj``) and after it (options of every command,
through the ``VaultOpt`` and ``JsonOpt`` types); the command's own value wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from siterecovery.cli.common import EXIT_CODES, JSON_HELP, VAULT_HELP, emit, resolve_vault
from siterecovery.domain.errors import Category

if TYPE_CHECKING:
    from siterecovery.cli.client import Client

VaultOpt = Annotated[
    Path | None,
    typer.Option("--vault", metavar="DIR", show_default=False, help=VAULT_HELP),
]
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
SiteOpt = Annotated[str | None, typer.Option("--site", metavar="SITE", help="Only this site.")]


@dataclass(frozen=True, slots=True)
class Globals:
    """The options given before the subcommand."""

    vault: Path | None = None
    json: bool = False


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
        emit(doc, human, as_json=self.json)

    def emit_plan(self, plan: dict[str, Any], human: Callable[[Any], None]) -> None:
        """Print a dry run's whole plan, then exit 3 (what a refusal by a rule
        exits with) when a precondition failed: the operation would be refused."""
        self.emit(plan, human)
        if not plan.get("ok", True):
            raise typer.Exit(EXIT_CODES[Category.RULE])

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
