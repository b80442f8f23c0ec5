"""Encryption keys: create and list them (by name, date and fingerprint only).

The material leaves the vault only through :func:`load_key`, called by the
code that seals a sync stream; every other answer is :meth:`SecretKey.describe`.
"""

from __future__ import annotations

from typing import Any

from siterecovery.domain.model import utcnow
from siterecovery.keys import SecretKey, generate
from siterecovery.services.context import Context
from siterecovery.store import keys as key_store
from siterecovery.store.repo import VaultStore


def create_key(ctx: Context, *, name: str) -> dict[str, Any]:
    """A new random AES-256 key named ``name``: its name, date and fingerprint."""
    key = generate(name, utcnow())
    return key_store.add_key(ctx.store, key=key).describe()


def list_keys(ctx: Context) -> list[dict[str, Any]]:
    """Name, date and fingerprint of every key."""
    return [key.describe() for key in key_store.list_keys(ctx.store)]


def load_key(store: VaultStore, *, name: str) -> SecretKey:
    """The key ``name`` with its material (KeyNotFound when missing)."""
    return key_store.get_key(store, name=name)
