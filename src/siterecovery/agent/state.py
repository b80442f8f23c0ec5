"""The agent directory: everything a site agent keeps, and nothing outside it.

::

    DIR/                    0700, made by ``agent init`` (:func:`init`)
    DIR/agent.json          {"site", "created" (epoch s), "version"}: written last by init
    DIR/agent.crt           the self-signed certificate (agent/tls.py); its pin is
                            the ``f`` of every join token
    DIR/agent.key           its private key, 0600
    DIR/secrets.json        {"secrets": [{"sha256": HEX, "joined": epoch s}]}, 0600: the
                            SHA-256 of every engine secret this agent accepted
    DIR/tokens/             0700: pending join tokens, one file per token named by
                            the token's SHA-256 (agent/tokens.py: digest), holding
                            {"created", "expires"} (epoch s); never the token itself
    DIR/tokens/used/        0700: consumed tokens, moved here by one ``rename``
    DIR/agent-url.json      {"url", "pid"} while ``agent serve`` runs (agent/server.py)
    DIR/site/               the site's storage (vms/, replicas/: the local provider's
                            layout), made by the engine's ``prepare`` after a join
    DIR/.NAME.partial       a file being replaced (transient: renamed over NAME)

**Consumption is one rename.** ``consume_token`` renames ``tokens/H`` to
``tokens/used/H``; of two joins racing with one token the kernel lets exactly
one rename succeed, the other finds no source (``ENOENT``) and, since
``tokens/used/H`` exists, is refused as "already used" — as is any later
replay. Pending tokens expired for more than a day, and used ones whose
expiry is that old, are deleted when a new token is made (a replay is then
"unknown": still refused).

**Secrets.** The agent keeps only the SHA-256 of each engine secret; a request's
bearer secret is hashed and compared in constant time with every entry
(:func:`check_secret`). Writers of ``secrets.json`` hold an exclusive
``flock`` on DIR itself, so no lock file is needed. Every file is written
whole (``.partial``, fsync, rename) with mode 0600 whatever the umask.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery import __version__
from siterecovery.agent import tls, tokens
from siterecovery.domain.errors import InvalidInput, JoinTokenRefused
from siterecovery.domain.values import check_name
from siterecovery.keys.master import sync_dir, write_private

AGENT_FILE = "agent.json"
SECRETS_FILE = "secrets.json"
URL_FILE = "agent-url.json"
TOKENS_DIR = "tokens"
USED_DIR = "used"
DEFAULT_TTL = 3600.0
"""Seconds a join token stays usable."""
PRUNE_AFTER = 86400.0
"""Seconds after its expiry a token file is deleted (by the next ``new_token``)."""
SITE_DIR = "site"
FILES = frozenset(
    {AGENT_FILE, tls.CERT_FILE, tls.KEY_FILE, SECRETS_FILE, TOKENS_DIR, URL_FILE, SITE_DIR}
)
"""The entries of DIR (besides transient ``.NAME.partial`` files)."""


@dataclass(frozen=True, slots=True)
class AgentState:
    """An initialised agent directory."""

    dir: Path
    site: str
    created: float
    version: str
    identity: tls.Identity

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint


def init(directory: Path, site: str) -> AgentState:
    """Make ``directory`` the agent directory of ``site``: identity, tokens/, secrets.json.

    Idempotent: an agent directory of the same site is returned unchanged (its
    identity kept). Refuses (InvalidInput) a directory of another site, and a
    non-empty directory holding anything but an agent's files.
    """
    check_name("site", site)
    directory = directory.absolute()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    existing = _read_json(directory / AGENT_FILE)
    if existing is not None and existing.get("site") != site:
        reason = f"{directory} is the agent directory of site '{existing.get('site')}'"
        raise InvalidInput(field="site", reason=f"{reason}; use another --dir")
    strangers = sorted(p.name for p in directory.iterdir() if not _ours(p.name))
    if existing is None and strangers:
        reason = f"{directory} is not an agent directory and holds {', '.join(strangers[:5])}"
        raise InvalidInput(field="dir", reason=f"{reason}; use a new or empty directory")
    identity = tls.make_identity(directory, site)
    identity.key.chmod(0o600)
    for sub in (directory / TOKENS_DIR, directory / TOKENS_DIR / USED_DIR):
        sub.mkdir(mode=0o700, exist_ok=True)
        sub.chmod(0o700)
    if not (directory / SECRETS_FILE).exists():
        _write_json(directory / SECRETS_FILE, {"secrets": []})
    if existing is None:
        _write_json(directory / AGENT_FILE, {"site": site, "created": time.time(),
                                             "version": __version__})  # fmt: skip
    return load(directory)


def load(directory: Path) -> AgentState:
    """The agent directory ``directory``; InvalidInput when ``agent init`` did not make it."""
    directory = directory.absolute()
    doc = _read_json(directory / AGENT_FILE)
    if doc is None:
        reason = f"{directory} is not an agent directory (see `siterecovery agent init`)"
        raise InvalidInput(field="dir", reason=reason)
    identity = tls.Identity(directory / tls.CERT_FILE, directory / tls.KEY_FILE)
    return AgentState(directory, str(doc["site"]), float(doc["created"]), str(doc["version"]),
                      identity)  # fmt: skip


# -- join tokens -----------------------------------------------------------------


def new_token(directory: Path, ttl: float = DEFAULT_TTL) -> str:
    """A new one-time join token valid ``ttl`` seconds; only its digest is stored."""
    state = load(directory)
    _prune(directory)
    token = tokens.make(state.fingerprint, state.site)
    now = time.time()
    path = directory / TOKENS_DIR / tokens.digest(token)
    _write_json(path, {"created": now, "expires": now + ttl})
    return token


def consume_token(directory: Path, token: str) -> None:
    """Use ``token`` up, or raise JoinTokenRefused (malformed, unknown, expired,
    already used). Atomic: of concurrent calls with one token exactly one returns."""
    tokens.parse(token)
    name = tokens.digest(token)
    pending = directory / TOKENS_DIR / name
    used = directory / TOKENS_DIR / USED_DIR / name
    doc = _read_json(pending)
    if doc is None:
        raise _refused(used)
    if float(doc["expires"]) <= time.time():
        raise JoinTokenRefused(reason=f"expired at {_when(float(doc['expires']))}")
    try:
        os.rename(pending, used)
    except FileNotFoundError:
        raise _refused(used) from None
    sync_dir(used.parent)


def _refused(used: Path) -> JoinTokenRefused:
    if used.exists():
        return JoinTokenRefused(reason="already used")
    return JoinTokenRefused(reason="unknown (not made by this agent, or long expired)")


def _prune(directory: Path) -> None:
    """Delete token files whose expiry is older than PRUNE_AFTER."""
    limit = time.time() - PRUNE_AFTER
    root = directory / TOKENS_DIR
    for path in [*root.iterdir(), *(root / USED_DIR).iterdir()]:
        if path.name.startswith(".") or not path.is_file():
            continue  # a token being written, or used/
        doc = _read_json(path)
        if doc is not None and float(doc.get("expires", 0)) < limit:
            path.unlink(missing_ok=True)


# -- engine secrets --------------------------------------------------------------


def add_secret(directory: Path, secret: str) -> None:
    """Accept ``secret`` from now on (its SHA-256 is appended to secrets.json)."""
    entry = {"sha256": _hash(secret), "joined": time.time()}
    with _locked(directory):
        doc = _read_json(directory / SECRETS_FILE) or {"secrets": []}
        doc["secrets"] = [*doc.get("secrets", []), entry]
        _write_json(directory / SECRETS_FILE, doc)


def check_secret(directory: Path, secret: str) -> bool:
    """Whether ``secret`` is one this agent accepted: compared in constant time
    with every entry (no early exit). Reads the file each time: an entry removed
    by hand is refused at once."""
    doc = _read_json(directory / SECRETS_FILE) or {}
    presented = _hash(secret)
    found = False
    for entry in doc.get("secrets", []):
        found |= hmac.compare_digest(presented, str(entry.get("sha256", "")))
    return found and bool(secret)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# -- the serving process ---------------------------------------------------------


def write_url(directory: Path, url: str) -> None:
    _write_json(directory / URL_FILE, {"url": url, "pid": os.getpid()})


def remove_url(directory: Path) -> None:
    (directory / URL_FILE).unlink(missing_ok=True)


# -- files -----------------------------------------------------------------------


def _ours(name: str) -> bool:
    return name in FILES or (name.startswith(".") and name.endswith(".partial"))


def _read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, None when it does not exist (or is not one)."""
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Replace ``path`` whole (readers see the old or the new file), mode 0600."""
    write_private(path, (json.dumps(doc, indent=2) + "\n").encode())


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on the directory itself (between threads and processes)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
