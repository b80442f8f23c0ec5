"""The vault master key: every key's material is stored wrapped under it.

``VAULT/master.key`` holds 32 random bytes (mode 0600). It stays in the vault
directory even when the database is on PostgreSQL: a copy of the database
alone reveals no key. A key's stored form is::

    "v1:" + base64(AES-KW(KEK, material))        59 characters
    KEK = HKDF-SHA256(master, info="siterecovery key wrap v1\\0" + name)

AES key wrap (RFC 3394, NIST SP 800-38F) is the standard construction for
wrapping keys: 40 bytes for 32, integrity-checked, so unwrapping with the
wrong master key or under another name fails instead of returning garbage.
The name enters the KEK, so a row's material moved to another name does not
unwrap. (AES-GCM would need 60 bytes, too long for the ``VARCHAR(64)`` column.)
Rows without the prefix are the plaintext base64 of older vaults; they are
read as such and re-wrapped by :func:`siterecovery.store.keys.open_keys`.

**Rotation** (``key rotate-master``) writes ``master.key.new`` (complete, then
renamed into place), re-wraps every row under it in one transaction, then
renames it over ``master.key``. Readers try ``master.key`` and, while it
exists, ``master.key.new``: a crash at any point leaves every key readable,
and the next rotation (or daemon start) finishes an interrupted one.
Rotation holds ``master.lock`` exclusively; every read and write of key
material holds it shared, around its database transaction, so no key is
wrapped under a master key that is being replaced.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from siterecovery.domain.errors import KeyUnreadable

MASTER_FILE = "master.key"
NEW_FILE = "master.key.new"
LOCK_FILE = "master.lock"
PREFIX = "v1:"
MASTER_BYTES = 32
_KEK_LABEL = b"siterecovery key wrap v1\0"
_ID_LABEL = b"siterecovery master key id v1\0"


def write_private(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` by ``data`` atomically, mode 0600 whatever the umask:
    readers see the old file or the whole new one (written to the transient
    ``.NAME.partial`` beside it, then renamed over it). ``durable``: the file
    and the rename are fsync'd, so they survive a power loss; without, a
    frequently rewritten cache of what can be seen again."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    if durable:
        sync_dir(path.parent)


def sync_dir(path: Path) -> None:
    """fsync a directory: the renames inside it survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def master_id(master: bytes) -> str:
    """A public name for a master key (16 hex digits): tells two apart, reveals nothing."""
    return blake3.blake3(_ID_LABEL + master).digest(length=8).hex()


def _kek(master: bytes, name: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEK_LABEL + name.encode())
    return hkdf.derive(master)


def wrap(master: bytes, name: str, material: bytes) -> str:
    """The stored form of key ``name``'s material under ``master``."""
    wrapped = aes_key_wrap(_kek(master, name), material)
    return PREFIX + base64.b64encode(wrapped).decode("ascii")


def is_wrapped(stored: str) -> bool:
    """Whether a stored value is wrapped (else the plaintext of an older vault)."""
    return stored.startswith(PREFIX)


@dataclass(frozen=True, slots=True)
class Keyring:
    """The master keys a reader may need: ``current`` (``master.key``, which new
    wraps use) and, during a rotation, the next one. ``repr`` shows neither."""

    path: Path
    current: bytes | None = field(repr=False)
    candidates: tuple[bytes, ...] = field(repr=False)

    def wrap(self, name: str, material: bytes) -> str:
        """``material`` wrapped under the current master key (KeyUnreadable if none)."""
        if self.current is None:
            raise KeyUnreadable(name=name, path=str(self.path))
        return wrap(self.current, name, material)

    def unwrap(self, name: str, stored: str) -> bytes:
        """The material of a stored value; KeyUnreadable when no master key opens it."""
        if not is_wrapped(stored):
            return _legacy(name, stored, self.path)
        try:
            wrapped = base64.b64decode(stored[len(PREFIX) :], validate=True)
        except binascii.Error:
            raise KeyUnreadable(name=name, path=str(self.path)) from None
        for master in self.candidates:
            try:
                return aes_key_unwrap(_kek(master, name), wrapped)
            except InvalidUnwrap:
                continue
        raise KeyUnreadable(name=name, path=str(self.path))


def _legacy(name: str, stored: str, path: Path) -> bytes:
    try:
        return base64.b64decode(stored.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeyUnreadable(name=name, path=str(path)) from None


class MasterKey:
    """The master key files of one vault directory, read on every use: a daemon
    sees a rotation made by ``key rotate-master`` in another process.

    Thread- and process-safe through ``master.lock`` (``flock``).
    """

    def __init__(self, vault_dir: Path) -> None:
        self.dir = vault_dir.absolute()
        self.path = self.dir / MASTER_FILE
        self.new_path = self.dir / NEW_FILE

    def ensure(self) -> bytes:
        """The current master key, created (32 random bytes, 0600) when missing.
        Two processes creating it at once agree on one (``link`` never replaces)."""
        if not self.path.exists():
            partial = self.dir / f"{MASTER_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
            write_private(partial, secrets.token_bytes(MASTER_BYTES))
            try:
                os.link(partial, self.path)
            except FileExistsError:
                pass
            finally:
                partial.unlink()
            sync_dir(self.dir)
        return self._read(self.path)

    @contextmanager
    def shared(self, *, create: bool = False) -> Iterator[Keyring]:
        """The keyring, with rotation held off until the block ends (put the
        database transaction inside). ``create``: make ``master.key`` if missing."""
        with self._locked(fcntl.LOCK_SH):
            yield self.keyring(create=create)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every reader and writer of key material (a rotation)."""
        with self._locked(fcntl.LOCK_EX):
            yield

    def next_key(self) -> bytes:
        """The key a rotation moves to: ``master.key.new`` of an interrupted
        rotation, else a new one written there (complete before it appears)."""
        if self.new_path.exists():
            return self._read(self.new_path)
        key = secrets.token_bytes(MASTER_BYTES)
        write_private(self.new_path, key)
        return key

    def install_next(self) -> None:
        """``master.key.new`` becomes ``master.key`` (atomic rename, synced)."""
        os.replace(self.new_path, self.path)
        sync_dir(self.dir)

    def keyring(self, *, create: bool = False) -> Keyring:
        """The master keys as the files are now, without locking: for a caller
        that already holds :meth:`exclusive`."""
        current = self.ensure() if create else self._read_if_present(self.path)
        following = self._read_if_present(self.new_path)
        found = tuple(k for k in (current, following) if k is not None)
        return Keyring(path=self.path, current=current, candidates=found)

    @contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, operation)
            yield
        finally:
            os.close(fd)

    def _read_if_present(self, path: Path) -> bytes | None:
        return self._read(path) if path.exists() else None

    def _read(self, path: Path) -> bytes:
        data = path.read_bytes()
        if len(data) != MASTER_BYTES:
            raise KeyUnreadable(name="(master key)", path=str(path))
        return data
