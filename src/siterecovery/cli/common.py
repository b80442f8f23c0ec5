"""What the commands share without Typer or Rich: where the vault is, its
database, the ``--json`` document and the argparse usage error.

The data-plane commands (``sync``, ``sync-receive``: cli/sync_cmd.py) import
only this module of the CLI's shared code: start-up time counts for a copy
tool (see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siterecovery.domain.errors import Category, InvalidInput

EXIT_CODES = {Category.USAGE: 2, Category.RULE: 3, Category.NOT_FOUND: 4}
"""The exit code of an error by its category (1 for the others)."""

if TYPE_CHECKING:
    from siterecovery.store.repo import VaultStore

VAULT_ENV = "SITERECOVERY_VAULT"
DEFAULT_VAULT = Path("siterecovery-vault")
VAULT_HELP = f"Vault directory (default: ${VAULT_ENV}, else ./{DEFAULT_VAULT})."
JSON_HELP = "Print exactly one JSON document on stdout."


class UsageError(Exception):
    """A command line argparse refused (``siterecovery sync``, ``sync-receive``).

    ``str(error)`` is argparse's message, ``usage`` the command's usage line.
    """

    def __init__(self, message: str, *, prog: str, usage: str) -> None:
        super().__init__(message)
        self.prog = prog
        self.usage = usage


def print_json(doc: Any) -> None:
    """Print ``doc`` as the one JSON document of the command."""
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def emit(doc: Any, human: Callable[[Any], None], *, as_json: bool) -> None:
    """Print ``doc`` as JSON with --json, else through ``human``."""
    if as_json:
        print_json(doc)
    else:
        human(doc)


def resolve_vault(given: Path | None) -> Path:
    """``--vault``, else ``$SITERECOVERY_VAULT``, else ``./siterecovery-vault``."""
    if given is not None:
        return given
    return Path(os.environ.get(VAULT_ENV) or DEFAULT_VAULT)


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
