"""Portal sessions: a signed cookie after login with the vault's API token, and CSRF.

The cookie holds a random session id and whether the session signed in, signed
(itsdangerous, timestamped) with a secret derived from the vault token: the
token itself never leaves the server, and a new token ends every session. The
CSRF token of a session is an HMAC of its id; every POST carries it, as the
form field ``csrf_token`` or the header ``X-CSRF-Token`` (htmx sends the header
from ``hx-headers`` on ``<body>``).

The login form has a session too (anonymous): signing in replaces it with a
new id, so a session id fixed before login is worth nothing after.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

COOKIE = "sr_portal"
MAX_AGE = 12 * 3600  # seconds a session lasts after sign-in
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"


class SignInRequired(Exception):
    """No signed-in session: the portal answers 401 with a way to /login."""


class CsrfRefused(Exception):
    """A POST without the session's CSRF token: refused (403), nothing done."""


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    signed_in: bool
    csrf: str


class Sessions:
    """Makes, signs and reads sessions for one vault token."""

    def __init__(self, token: str) -> None:
        secret = hmac.new(token.encode(), b"siterecovery portal", hashlib.sha256).digest()
        self._csrf_key = hmac.new(secret, b"csrf", hashlib.sha256).digest()
        self._signer = URLSafeTimedSerializer(secret.hex(), salt="portal-session")
        self._token = token

    def new(self, *, signed_in: bool) -> Session:
        return self._session(secrets.token_urlsafe(24), signed_in)

    def _session(self, sid: str, signed_in: bool) -> Session:
        csrf = hmac.new(self._csrf_key, sid.encode(), hashlib.sha256).hexdigest()
        return Session(sid=sid, signed_in=signed_in, csrf=csrf)

    def load(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, or None when absent, forged or expired."""
        if not cookie:
            return None
        try:
            sid, signed_in = self._signer.loads(cookie, max_age=MAX_AGE)
        except (BadSignature, ValueError, TypeError):
            return None
        return self._session(str(sid), bool(signed_in))

    def dump(self, session: Session) -> str:
        return self._signer.dumps([session.sid, session.signed_in])

    def token_matches(self, given: str) -> bool:
        return secrets.compare_digest(given.strip().encode(), self._token.encode())


def sessions(request: Request) -> Sessions:
    token: str = request.app.state.token
    return Sessions(token)


def current(request: Request) -> Session | None:
    return sessions(request).load(request.cookies.get(COOKIE))


def signed_in(request: Request) -> Session:
    """Dependency of every portal page: the signed-in session, else 401."""
    session = current(request)
    if session is None or not session.signed_in:
        raise SignInRequired()
    return session


async def posted_with_csrf(request: Request) -> Session:
    """Dependency of every portal POST but the login: signed in and CSRF-checked."""
    session = signed_in(request)
    await require_csrf(request, session)
    return session


async def require_csrf(request: Request, session: Session) -> None:
    given = request.headers.get(CSRF_HEADER)
    if given is None:
        form = await request.form()
        field = form.get(CSRF_FIELD)
        given = field if isinstance(field, str) else None
    if not given or not secrets.compare_digest(given.encode(), session.csrf.encode()):
        raise CsrfRefused()


def set_cookie(request: Request, response: Response, session: Session) -> None:
    response.set_cookie(
        COOKIE,
        sessions(request).dump(session),
        max_age=MAX_AGE,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
