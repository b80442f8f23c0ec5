"""The engine's side of the agent's control API (agent/server.py).

:func:`join` turns a join token into what the engine keeps for a site: the
agent's certificate (pinned from then on) and its secret. :class:`AgentClient`
calls the agent with them. Foreign errors are translated here, once:

    httpx connect error, reset, timeout     -> AgentUnreachable(site, url, detail)
    the agent's certificate is not the pin  -> AgentCertificateMismatch(url, got, expected)
    401                                     -> AgentUnauthorized
    any other error document                -> the class of its code (error_from_dict),
                                               InternalError for a code we do not know

A timeout means the agent may still be carrying the request out (the message
says so): the engine's operations must be idempotent or checked before a retry.
Joining is not: a join whose answer is lost used its token up, make a new one.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from siterecovery.agent import tls, tokens
from siterecovery.domain.errors import (
    AgentCertificateMismatch,
    AgentUnauthorized,
    AgentUnreachable,
    InternalError,
    InvalidInput,
    SiteRecoveryError,
    error_from_dict,
)

NDJSON = "application/x-ndjson"
OnEvent = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """``GET /v1/info``, with what the call measured.

    ``time`` is the agent's clock (epoch s); ``round_trip`` the call's duration
    (s, monotonic); ``clock_offset`` = agent time − the local wall clock at the
    call's midpoint (s; accurate to about ``round_trip / 2``).
    """

    site: str
    version: str
    time: float
    fingerprint: str
    operations: dict[str, str]
    """name -> "unary" or "streaming"."""
    round_trip: float
    clock_offset: float


@dataclass(frozen=True, slots=True)
class Joined:
    """What a join gives the engine to keep for the site (the secret is secret)."""

    site: str
    secret: str = field(repr=False)
    cert_pem: str = field(repr=False)
    fingerprint: str
    version: str


CONNECT_TIMEOUT = 5.0
"""Seconds to open a connection to an agent (TCP and TLS handshake)."""
SILENCE = 15.0
"""Seconds a call may stay silent before its agent counts as lost: every call is
answered as a stream with a heartbeat every 2 s (agent/server.py: HEARTBEAT),
so this is a cut link or a dead agent, never a long operation."""


class AgentClient:
    """Calls one agent over HTTPS trusting only ``cert_pem``, with the engine's secret.

    Thread-safe: one connection pool shared by every thread. ``timeout`` (s)
    bounds each read: the answer of ``info``, and for a call the wait for its
    next line (calls are answered as streams, with a heartbeat line every 2 s
    of silence: an operation may run for hours, a cut link is noticed within
    ``timeout``); connecting is bounded by :data:`CONNECT_TIMEOUT` at most (an
    agent behind a cut link is known unreachable in seconds, not after a
    whole read timeout). Close it with :meth:`close` (or use it as a context manager).
    """

    def __init__(
        self, url: str, cert_pem: str, secret: str, *, site: str, timeout: float = SILENCE
    ) -> None:
        _address(url)  # https://HOST:PORT, or InvalidInput
        self.url = url.rstrip("/")
        self.site = site
        self.fingerprint = tls.fingerprint(cert_pem)
        self._timeout = timeout
        self._http = httpx.Client(
            base_url=self.url,
            verify=tls.client_context(cert_pem),
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
            headers={"Authorization": f"Bearer {secret}", "Accept": NDJSON},
            trust_env=False,  # no proxy from the environment between us and the pin
        )

    def info(self) -> AgentInfo:
        """The agent's identity, version, operations and clock offset."""
        wall, start = time.time(), time.perf_counter()
        with self._translated():
            response = self._http.get("/v1/info")
        round_trip = time.perf_counter() - start
        doc = self._document(response)
        return AgentInfo(
            site=str(doc["site"]),
            version=str(doc["version"]),
            time=float(doc["time"]),
            fingerprint=str(doc["fingerprint"]),
            operations={str(op["name"]): str(op["kind"]) for op in doc["operations"]},
            round_trip=round_trip,
            clock_offset=float(doc["time"]) - (wall + round_trip / 2),
        )

    def call(self, name: str, /, **args: Any) -> Any:
        """Run operation ``name`` with ``args``; its result (a streaming
        operation's events are dropped)."""
        return self.stream(name, None, **args)

    def stream(self, name: str, on_event: OnEvent | None, /, **args: Any) -> Any:
        """Run operation ``name``; ``on_event(event)`` for each event it emits
        (in this thread, in order), and ``on_event({})`` at each heartbeat (so
        that a caller's own checks, e.g. a cancel request, run while the
        operation is silent), then its result. An exception raised by
        ``on_event`` closes the call: the operation is cancelled at its next event."""
        with (
            self._translated(),
            self._http.stream("POST", f"/v1/call/{quote(name, safe='')}", json=args) as response,
        ):
            if response.status_code != 200:
                response.read()
                raise self._refusal(response)
            if response.headers.get("content-type", "").startswith(NDJSON):
                return self._events(response, on_event)
            response.read()
            return self._document(response)["result"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _events(self, response: httpx.Response, on_event: OnEvent | None) -> Any:
        for line in response.iter_lines():
            if not line.strip():
                if on_event is not None:
                    on_event({})
                continue
            doc = json.loads(line)
            if "event" in doc:
                if on_event is not None:
                    on_event(doc["event"])
            elif "result" in doc:
                return doc["result"]
            else:
                raise _rebuilt(doc.get("error"), self.url)
        detail = "the answer ended before the operation's result (the agent stopped?)"
        raise AgentUnreachable(site=self.site, url=self.url, detail=detail)

    def _document(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise self._refusal(response)
        doc = response.json()
        if not isinstance(doc, dict):
            raise InternalError(detail=f"the agent at {self.url} answered {doc!r}")
        return doc

    def _refusal(self, response: httpx.Response) -> SiteRecoveryError:
        return _refusal(response, self.url)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        with _translated(self.site, self.url, self.fingerprint, self._timeout):
            yield


def join(url: str, token: str, *, timeout: float = 30.0) -> Joined:
    """Join the agent at ``url`` (``https://HOST:PORT``) with a one-time ``token``.

    Checks the certificate against the token's pin before sending the token
    (AgentCertificateMismatch), then sends it over TLS trusting only that
    certificate. JoinTokenRefused: malformed (before any connection), or the
    agent's refusal (unknown, expired, already used).
    """
    parsed = tokens.parse(token)
    host, port = _address(url)
    pem = tls.fetch_pinned(host, port, parsed.fingerprint, timeout=timeout, site=parsed.site)
    base = url.rstrip("/")
    with (
        _translated(parsed.site, base, parsed.fingerprint, timeout),
        httpx.Client(verify=tls.client_context(pem), timeout=timeout, trust_env=False) as http,
    ):
        response = http.post(f"{base}/v1/join", json={"token": token.strip()})
    if response.status_code != 200:
        raise _refusal(response, base)
    doc = response.json()
    return Joined(site=str(doc["site"]), secret=str(doc["secret"]), cert_pem=pem,
                  fingerprint=parsed.fingerprint, version=str(doc["version"]))  # fmt: skip


# -- translation ---------------------------------------------------------------


@contextmanager
def _translated(site: str, url: str, pin: str, timeout: float) -> Iterator[None]:
    """httpx's transport errors as ours (see the module's table)."""
    try:
        yield
    except httpx.ConnectTimeout as e:
        detail = f"no connection within {min(timeout, CONNECT_TIMEOUT):g} s (ConnectTimeout)"
        raise AgentUnreachable(site=site, url=url, detail=detail) from e
    except httpx.TimeoutException as e:
        detail = (f"no answer within {timeout:g} s ({type(e).__name__}); it may still be "
                  "carrying the request out")  # fmt: skip
        raise AgentUnreachable(site=site, url=url, detail=detail) from e
    except httpx.TransportError as e:
        if _certificate_refused(e):
            raise _mismatch(site, url, pin, timeout) from e
        raise AgentUnreachable(site=site, url=url, detail=_detail(e)) from e


def _certificate_refused(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _mismatch(site: str, url: str, pin: str, timeout: float) -> SiteRecoveryError:
    """What the agent at ``url`` presents instead of the pinned certificate."""
    host, port = _address(url)
    pem = tls.peer_certificate(host, port, timeout, site=site)
    got = tls.fingerprint(pem) if pem else "none"
    if got == pin:  # the pinned certificate itself was refused (expired?)
        detail = "TLS refused the pinned certificate itself (expired?)"
        return AgentUnreachable(site=site, url=url, detail=detail)
    return AgentCertificateMismatch(url=url, got=got, expected=pin)


def _detail(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _refusal(response: httpx.Response, url: str) -> SiteRecoveryError:
    """The error of a non-200 answer: its document's class, by code."""
    try:
        document = response.json().get("error")
    except (ValueError, AttributeError):
        document = None
    if document is None and response.status_code == 401:
        return AgentUnauthorized(reason=f"the agent at {url} answered 401")
    return _rebuilt(document, url, status=response.status_code)


def _rebuilt(document: Any, url: str, *, status: int = 200) -> SiteRecoveryError:
    error = error_from_dict(document)
    if error is not None:
        return error
    text = json.dumps(document)[:300]
    return InternalError(detail=f"the agent at {url} answered HTTP {status}: {text}")


def _address(url: str) -> tuple[str, int]:
    """``(host, port)`` of ``https://HOST:PORT``; InvalidInput otherwise."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "https" or not parts.hostname or port is None:
        raise InvalidInput(field="url", reason=f"'{url}' is not https://HOST:PORT")
    return parts.hostname, port
