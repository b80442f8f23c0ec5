"""The HTTP client of the daemon's REST API (``/api/v1``), used by the CLI only.

The daemon advertises itself in the vault directory: ``VAULT/daemon.json``
(``{"url": ..., "pid": ...}``) and ``VAULT/token`` (the bearer token). Every
failure surfaces as a :class:`~siterecovery.domain.errors.SiteRecoveryError`,
translated here once:

- no ``daemon.json``, no token, or no answer from the URL -> ``DaemonUnavailable``;
- an API error body ``{"error": {"code", "message", "details"}}`` -> the error
  class of that code (an unknown code becomes a ``RemoteError`` keeping it), so
  ``except VmNotFound`` works on the client side as it does in the services;
- any other non-2xx answer -> ``InternalError`` naming the status.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from siterecovery.domain.errors import (
    DaemonTimeout,
    DaemonUnavailable,
    InternalError,
    SiteRecoveryError,
    all_error_classes,
)

API_PREFIX = "/api/v1"
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = float(os.environ.get("SITERECOVERY_CLIENT_TIMEOUT") or 120.0)
"""Seconds a request may wait for its answer unless the call says otherwise
(``SITERECOVERY_CLIENT_TIMEOUT``). Past it the CLI says DAEMON_TIMEOUT: the
daemon is up and may still carry the request out, so it is not "no daemon"."""

NO_TIMEOUT: float | None = None
"""Pass as ``read_timeout=`` for calls that take as long as their work (a replication pass)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the daemon of ``vault`` answers and the token it expects."""

    vault: Path
    url: str
    token: str = field(repr=False)

    @classmethod
    def of_vault(cls, vault: Path) -> Endpoint:
        """Read ``daemon.json`` and ``token``; DaemonUnavailable if either is unusable."""
        url = _read_url(vault)
        try:
            token = (vault / "token").read_text().strip()
        except OSError as exc:
            raise DaemonUnavailable(
                vault=str(vault), reason=f"cannot read the token: {exc}"
            ) from None
        return cls(vault=vault, url=url.rstrip("/"), token=token)


def _read_url(vault: Path) -> str:
    path = vault / "daemon.json"
    try:
        url = json.loads(path.read_text())["url"]
    except FileNotFoundError:
        raise DaemonUnavailable(vault=str(vault), reason=f"{path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DaemonUnavailable(vault=str(vault), reason=f"{path} is unreadable: {exc!r}") from None
    if not isinstance(url, str):
        raise DaemonUnavailable(vault=str(vault), reason=f"{path} has no URL")
    return url


class Client:
    """A session with one daemon. Not thread-safe: one per command invocation.

    Paths are relative to ``/api/v1``; path segments coming from users must go
    through :func:`segment`. Answers are the decoded JSON bodies.
    """

    def __init__(self, endpoint: Endpoint, *, transport: httpx.BaseTransport | None = None) -> None:
        self.endpoint = endpoint
        self._http = httpx.Client(
            base_url=endpoint.url + API_PREFIX,
            headers={"Authorization": f"Bearer {endpoint.token}"},
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            transport=transport,
        )

    @classmethod
    def of_vault(cls, vault: Path) -> Client:
        return cls(Endpoint.of_vault(vault))

    def get(self, path: str, *, read_timeout: float | None = READ_TIMEOUT, **params: Any) -> Any:
        """GET ``path`` with the query ``params`` that are not None."""
        return self.request("GET", path, params=params, read_timeout=read_timeout)

    def post(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        read_timeout: float | None = READ_TIMEOUT,
        **params: Any,
    ) -> Any:
        """POST ``body`` (keys whose value is None are left out: the server's defaults apply)."""
        return self.request("POST", path, params=params, body=body, read_timeout=read_timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        read_timeout: float | None = READ_TIMEOUT,
    ) -> Any:
        """Send one request; the decoded answer, or the error it stands for.

        ``read_timeout`` is in seconds (None: wait as long as the daemon works).
        """
        response = self._send(
            method,
            path,
            params=_present(params or {}),
            json=None if body is None else _present(body),
            timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT),
        )
        if response.is_success:
            return _decode(response)
        raise error_of_response(response)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            seconds = kwargs["timeout"].read if kwargs.get("timeout") else READ_TIMEOUT
            raise DaemonTimeout(
                url=self.endpoint.url, method=method, path=path, seconds=seconds or 0
            ) from None
        except httpx.TransportError as exc:
            reason = f"{self.endpoint.url} does not answer ({type(exc).__name__}: {exc})"
            raise DaemonUnavailable(vault=str(self.endpoint.vault), reason=reason) from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def segment(value: str) -> str:
    """``value`` quoted as one URL path segment (a name may hold '/', '?', spaces)."""
    return quote(value, safe="")


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def _decode(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise InternalError(
            detail=f"{response.request.url} answered {response.status_code} without JSON"
        ) from None


def error_of_response(response: httpx.Response) -> SiteRecoveryError:
    """The error an API error answer stands for."""
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        details = error.get("details") or {}
    except (ValueError, KeyError, TypeError):
        text = response.text[:200]
        return InternalError(
            detail=f"{response.request.url} answered HTTP {response.status_code}: {text}"
        )
    return remote_error(code, message, details if isinstance(details, dict) else {})


def remote_error(code: str, message: str, details: dict[str, Any]) -> SiteRecoveryError:
    """An instance of the class of ``code`` carrying the server's message and details.

    The server already formatted the message, so the template is not applied
    again. A code this client does not know (a newer daemon, or an HTTP-level
    refusal such as ``UNAUTHORIZED``) becomes a :class:`RemoteError` keeping it.
    """
    cls = _class_of(code)
    if cls is None:
        return RemoteError(remote_code=code, message=message, details=details)
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.fields = dict(details)
    return error


def _class_of(code: str) -> type[SiteRecoveryError] | None:
    for cls in all_error_classes():
        if cls.code == code and cls is not RemoteError:
            return cls
    return None


class RemoteError(SiteRecoveryError):
    """An API error with a code outside the error tree; ``to_dict`` reports that code."""

    code = "REMOTE_ERROR"
    template = "{message}"

    def __init__(self, *, remote_code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(message=message, remote_code=remote_code, details=details)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.fields["remote_code"],
            "message": self.message,
            "details": self.fields["details"],
        }
