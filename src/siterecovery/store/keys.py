"""The vault's encryption keys (table ``keys``, Alembic 0002).

Keyword-only functions over a :class:`~siterecovery.store.repo.VaultStore`,
returning :class:`~siterecovery.keys.SecretKey`. The material is stored in
base64 next to its fingerprint; nothing here logs or formats it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, mapped_column

from siterecovery.domain.errors import AlreadyExists, KeyNotFound
from siterecovery.keys import SecretKey, decode_material, encode_material
from siterecovery.store.repo import VaultStore
from siterecovery.store.schema import Base


class KeyRow(Base):
    __tablename__ = "keys"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[datetime]
    material: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))


def add_key(store: VaultStore, *, key: SecretKey) -> SecretKey:
    """Store a new key; AlreadyExists when the name is taken (nothing changes)."""
    with store.session() as s:
        if s.get(KeyRow, key.name) is not None:
            raise AlreadyExists(kind="key", name=key.name)
        s.add(
            KeyRow(
                name=key.name,
                created=key.created,
                material=encode_material(key.material),
                fingerprint=key.fingerprint,
            )
        )
    return key


def get_key(store: VaultStore, *, name: str) -> SecretKey:
    """The key ``name`` with its material; KeyNotFound when there is none."""
    with store.session() as s:
        row = s.get(KeyRow, name)
        if row is None:
            raise KeyNotFound(name=name)
        return _key(row)


def list_keys(store: VaultStore) -> list[SecretKey]:
    """Every key, by name."""
    with store.session() as s:
        return [_key(row) for row in s.scalars(select(KeyRow).order_by(KeyRow.name))]


def _key(row: KeyRow) -> SecretKey:
    return SecretKey(name=row.name, created=row.created, material=decode_material(row.material))
