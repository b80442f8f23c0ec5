"""Join tokens: how an engine learns, once and out of band, which agent to trust.

A join token is made on the agent's machine (``siterecovery agent token``) and
handed by the administrator to the engine (``site join``). It is one line::

    srj1-<base64url, no padding, of the compact JSON {"f": FINGERPRINT, "t": RANDOM, "s": SITE}>

- ``f``: the agent certificate's pin, ``sha256:HEX`` (:func:`tls.fingerprint`);
  the engine checks the certificate the agent presents against it before it
  sends anything (:func:`tls.fetch_pinned`).
- ``t``: 32 random bytes (``secrets.token_urlsafe``): the secret part.
- ``s``: the agent's site name, for messages and a consistency check.

The agent keeps only the SHA-256 of the whole token string (:func:`digest`),
so a copy of the agent directory reveals no usable token. A token is used at
most once (agent/state.py) and expires (one hour by default).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from dataclasses import dataclass

from siterecovery.domain.errors import JoinTokenRefused

PREFIX = "srj1-"
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_LENGTH = 1024


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A parsed token: the agent's certificate pin, its secret part, its site."""

    fingerprint: str
    random: str
    site: str


def make(fingerprint: str, site: str) -> str:
    """A new token string for the agent pinned by ``fingerprint`` (not stored here)."""
    return encode(JoinToken(fingerprint, secrets.token_urlsafe(32), site))


def encode(token: JoinToken) -> str:
    """The string form of ``token`` (:func:`parse` reverses it)."""
    doc = {"f": token.fingerprint, "t": token.random, "s": token.site}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse(token: str) -> JoinToken:
    """The fields of ``token``; JoinTokenRefused(reason="malformed…") when it is not one."""
    text = token.strip()
    if not text.startswith(PREFIX) or len(text) > _MAX_LENGTH:
        raise _malformed(f"it does not start with '{PREFIX}'")
    body = text[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        doc = json.loads(raw)
    except (binascii.Error, ValueError):
        raise _malformed("its body is not base64url JSON") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in "fts"):
        raise _malformed("it lacks the fields f, t and s")
    if not _FINGERPRINT.fullmatch(doc["f"]) or len(doc["t"]) < 32 or not doc["s"]:
        raise _malformed("its fingerprint, secret or site is invalid")
    return JoinToken(fingerprint=doc["f"], random=doc["t"], site=doc["s"])


def digest(token: str) -> str:
    """Hex SHA-256 of the token string: its name in the agent's ``tokens/``."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def _malformed(why: str) -> JoinTokenRefused:
    return JoinTokenRefused(reason=f"malformed token ({why})")
