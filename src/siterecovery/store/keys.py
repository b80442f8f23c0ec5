"""The vault's encryption keys (table ``keys``, Alembic 0002).

Keyword-only functions over a :class:`~siterecovery.store.repo.VaultStore`
and the vault's :class:`~siterecovery.keys.master.MasterKey`, returning
:class:`~siterecovery.keys.SecretKey`. The ``material`` column holds the
material wrapped under the master key (``v1:…``, see ``keys/master.py``),
next to its fingerprint; nothing here logs or formats it. Every function
holds the master key's lock around its transaction (shared; rotation:
exclusive), so no key is ever wrapped under a master key being replaced.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from siterecovery.domain.errors import AlreadyExists, KeyNotFound
from siterecovery.keys import SecretKey
from siterecovery.keys.master import Keyring, MasterKey, is_wrapped, master_id, wrap
from siterecovery.store.repo import VaultStore
from siterecovery.store.schema import Base


class KeyRow(Base):
    __tablename__ = "keys"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[datetime]
    material: Mapped[str] = mapped_column(String(64))
    fingerprint: Mapped[str] = mapped_column(String(64))


def add_key(store: VaultStore, *, master: MasterKey, key: SecretKey) -> SecretKey:
    """Store a new key; AlreadyExists when the name is taken (nothing changes)."""
    with master.shared(create=True) as ring, store.session() as s:
        if s.get(KeyRow, key.name) is not None:
            raise AlreadyExists(kind="key", name=key.name)
        s.add(
            KeyRow(
                name=key.name,
                created=key.created,
                material=ring.wrap(key.name, key.material),
                fingerprint=key.fingerprint,
            )
        )
    return key


def get_key(store: VaultStore, *, master: MasterKey, name: str) -> SecretKey:
    """The key ``name`` with its material; KeyNotFound when there is none,
    KeyUnreadable when the master key does not open it."""
    with master.shared() as ring, store.session() as s:
        row = s.get(KeyRow, name)
        if row is None:
            raise KeyNotFound(name=name)
        return _key(row, ring)


def list_keys(store: VaultStore, *, master: MasterKey) -> list[SecretKey]:
    """Every key, by name."""
    with master.shared() as ring, store.session() as s:
        return [_key(row, ring) for row in _rows(s)]


def rotate_master(store: VaultStore, *, master: MasterKey) -> dict[str, Any]:
    """Move every key to a new master key (or finish an interrupted rotation).

    Order, each step safe to crash after: (1) ``master.key.new`` is written
    whole; (2) one transaction re-wraps every row under it (readers open rows
    with either file); (3) it is renamed over ``master.key``. Answers the new
    master key's public id and how many keys were re-wrapped.
    """
    with master.exclusive():
        following = master.next_key()
        ring = master.keyring()
        with store.session() as s:
            rows = _rows(s)
            for row in rows:
                row.material = wrap(following, row.name, ring.unwrap(row.name, row.material))
        master.install_next()
    scrub(store)
    return {"master": master_id(following), "keys": len(rows)}


def open_keys(store: VaultStore, *, master: MasterKey) -> int:
    """Bring a vault's keys to the current format on open: finish a rotation a
    crash interrupted, create the master key if missing, wrap the plaintext
    rows of an older vault. Answers how many rows were wrapped. Idempotent."""
    if master.new_path.exists():
        rotate_master(store, master=master)
    with master.shared(create=True) as ring, store.session() as s:
        plain = [row for row in _rows(s) if not is_wrapped(row.material)]
        for row in plain:
            row.material = ring.wrap(row.name, ring.unwrap(row.name, row.material))
    if plain:
        scrub(store)
    return len(plain)


def scrub(store: VaultStore) -> None:
    """Leave no replaced value in a SQLite vault's files: ``VACUUM`` rebuilds the
    database without its free pages, a ``TRUNCATE`` checkpoint empties the WAL
    (best effort while other connections read). PostgreSQL drops dead rows at
    its next vacuum."""
    if store.engine.dialect.name != "sqlite":
        return
    raw = store.engine.raw_connection()  # autocommit: VACUUM refuses a transaction
    try:
        cursor = raw.cursor()
        cursor.execute("VACUUM")
        cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        cursor.close()
    finally:
        raw.close()


def _rows(s: Session) -> list[KeyRow]:
    return list(s.scalars(select(KeyRow).order_by(KeyRow.name)))


def _key(row: KeyRow, ring: Keyring) -> SecretKey:
    material = ring.unwrap(row.name, row.material)
    return SecretKey(name=row.name, created=row.created, material=material)
