"""Encryption keys: create, list, export and import them.

The material leaves the vault only through :func:`load_key`, called by the
code that seals a sync stream, :func:`transfer_key`, for the transfers of an
item whose policy names the key (handed to the two agents of each transfer),
and :func:`export_key`, which writes it to a file only its owner can read (to
import into the vault of the other site);
every other answer is :meth:`SecretKey.describe`. In the vault the material
is wrapped under the vault master key (``keys/master.py``); the functions that
take a ``store`` run without a daemon and are given the vault's
:class:`MasterKey` with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from siterecovery.context import Context
from siterecovery.domain.errors import AlreadyExists, InvalidInput
from siterecovery.domain.model import utcnow
from siterecovery.keys import SecretKey, export_document, generate, parse_export
from siterecovery.keys.master import MasterKey
from siterecovery.store import keys as key_store
from siterecovery.store.agents import list_agents
from siterecovery.store.repo import VaultStore


def create_key(ctx: Context, *, name: str) -> dict[str, Any]:
    """A new random AES-256 key named ``name``: its name, date and fingerprint."""
    key = generate(name, utcnow())
    return key_store.add_key(ctx.store, master=MasterKey(ctx.vault_dir), key=key).describe()


def list_keys(ctx: Context) -> list[dict[str, Any]]:
    """Name, date and fingerprint of every key."""
    return [
        key.describe() for key in key_store.list_keys(ctx.store, master=MasterKey(ctx.vault_dir))
    ]


def load_key(store: VaultStore, *, master: MasterKey, name: str) -> SecretKey:
    """The key ``name`` with its material (KeyNotFound when missing)."""
    return key_store.get_key(store, master=master, name=name)


def transfer_key(ctx: Context, *, name: str) -> SecretKey:
    """The key ``name`` to seal an item's transfers between sites with.

    KeyNotFound when the vault has none; InvalidInput for the engine's secret
    of an agent (``agent-SITE``): it would be handed to the agents of a transfer.
    """
    if any(agent.secret_key == name for agent in list_agents(ctx.store)):
        reason = f"'{name}' is the engine's secret for a site agent, not a transfer key"
        raise InvalidInput(field="key", reason=reason + " (`siterecovery key create NAME`)")
    return key_store.get_key(ctx.store, master=MasterKey(ctx.vault_dir), name=name)


def rotate_master(store: VaultStore, *, master: MasterKey) -> dict[str, Any]:
    """A new vault master key, every key re-wrapped under it (see
    :func:`siterecovery.store.keys.rotate_master`): its id and the key count."""
    return key_store.rotate_master(store, master=master)


def export_key(store: VaultStore, *, master: MasterKey, name: str, path: Path) -> dict[str, Any]:
    """Write key ``name`` to a new file at ``path`` (mode 0600); AlreadyExists when
    the file exists (nothing is overwritten). The answer describes the key only."""
    key = key_store.get_key(store, master=master, name=name)
    text = json.dumps(export_document(key), indent=2) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AlreadyExists(kind="file", name=str(path)) from None
    except OSError as e:
        raise InvalidInput(field="to", reason=f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return {**key.describe(), "file": str(path)}


def import_key(
    store: VaultStore, *, master: MasterKey, path: Path, name: str | None = None
) -> dict[str, Any]:
    """Add the key of a key file to the vault (under ``name`` if given).

    Importing the same key again is a no-op; another key under a taken name is
    refused (AlreadyExists), as is a damaged file (InvalidInput).
    """
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(field="file", reason=f"cannot read a key file at {path}: {e}") from None
    key = parse_export(document, name=name)
    existing = {k.name: k for k in key_store.list_keys(store, master=master)}.get(key.name)
    if existing is not None and existing.fingerprint == key.fingerprint:
        return existing.describe()
    return key_store.add_key(store, master=master, key=key).describe()
