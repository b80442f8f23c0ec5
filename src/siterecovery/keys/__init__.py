"""Named AES-256 keys: what a key is, how it is made and recognised.

A key is 32 random bytes (``material``) under a name. Its ``fingerprint`` —
the first 16 bytes of BLAKE3 over a domain label and the material, in hex —
names the material without revealing it: two sides compare fingerprints to
tell "different key" from "corrupt data". The material is only ever read by
the code that seals a sync stream; ``repr`` and :meth:`SecretKey.describe`
leave it out, so it never reaches a log, an API answer or the CLI.
Keys live in the vault (``store/keys.py``), wrapped under the vault master
key (``keys/master.py``).
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import blake3

from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.values import check_name as _check_name

KEY_BYTES = 32
"""AES-256: 32 bytes of material."""

_LABEL = b"siterecovery key fingerprint v1\0"


def check_name(name: str) -> str:
    """``name`` if it is a valid key name (as for sites and VMs), else InvalidInput."""
    return _check_name("name", name)


def fingerprint(material: bytes) -> str:
    """The public name of ``material``: 32 hex digits."""
    return blake3.blake3(_LABEL + material).digest(length=16).hex()


@dataclass(frozen=True, slots=True)
class SecretKey:
    """A named key with its material. Never printed: ``repr`` hides the material."""

    name: str
    created: datetime
    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_name(self.name)
        if len(self.material) != KEY_BYTES:
            raise InvalidInput(field="material", reason=f"a key is {KEY_BYTES} bytes")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.material)

    def describe(self) -> dict[str, Any]:
        """What may be shown of a key: name, created (ISO 8601), fingerprint."""
        return {
            "name": self.name,
            "created": self.created.isoformat(),
            "fingerprint": self.fingerprint,
        }


def generate(name: str, created: datetime) -> SecretKey:
    """A new key of 32 bytes from the operating system's CSPRNG."""
    material = secrets.token_bytes(KEY_BYTES)
    return SecretKey(name=check_name(name), created=created, material=material)


def encode_material(material: bytes) -> str:
    """Key material in base64: its form in a key file (the vault stores it wrapped)."""
    return base64.b64encode(material).decode("ascii")


def decode_material(text: str) -> bytes:
    """Key material from its base64 form."""
    return base64.b64decode(text.encode("ascii"), validate=True)


EXPORT_FORMAT = "siterecovery-key-v1"


def export_document(key: SecretKey) -> dict[str, Any]:
    """The key file's content (JSON): the one form in which material leaves a vault."""
    return {
        "format": EXPORT_FORMAT,
        "name": key.name,
        "created": key.created.isoformat(),
        "material": encode_material(key.material),
        "fingerprint": key.fingerprint,
    }


def parse_export(document: Any, *, name: str | None = None) -> SecretKey:
    """The key a key file holds (renamed ``name`` if given); InvalidInput when the
    file is not a key file or its material does not match its fingerprint."""
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise InvalidInput(field="file", reason=f"not a {EXPORT_FORMAT} key file")
    try:
        material = decode_material(str(document["material"]))
        created = datetime.fromisoformat(str(document["created"]))
        key = SecretKey(name=check_name(name or str(document["name"])), created=created,
                        material=material)  # fmt: skip
    except (KeyError, ValueError) as e:
        raise InvalidInput(field="file", reason=f"the key file is damaged: {e}") from None
    if key.fingerprint != document.get("fingerprint"):
        reason = "the key file is damaged: its material does not match its fingerprint"
        raise InvalidInput(field="file", reason=reason)
    return key
