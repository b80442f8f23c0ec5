"""How an ``azure-blob`` site is described, and the one place Azure errors are translated.

A site of provider ``azure-blob`` has, as its ``path``, the URL of a blob
container with a reference to its credentials (never the credentials)::

    https://ACCOUNT.blob.core.windows.net/CONTAINER?credential=file:/etc/siterecovery/dr.key
    http://127.0.0.1:10000/devstoreaccount1/CONTAINER?credential=env:DR_STORAGE&retries=1

* The account URL is everything before the container. On an IP address or
  ``localhost`` (Azurite, a private endpoint by address) the first path
  segment is the account name (path-style URL); otherwise the first label of
  the host is.
* ``credential`` is ``file:ABSOLUTE_PATH`` (a file of mode 0600 or stricter:
  a group- or world-readable one is refused) or ``env:NAME`` (an environment
  variable of the agent); default ``env:AZURE_STORAGE_CONNECTION_STRING``.
  What it holds is either the account's access key (base64) or a connection
  string (``AccountName=…;AccountKey=…`` or ``SharedAccessSignature=…``; its
  endpoints are ignored: the site's URL is the endpoint).
* ``retries`` (default 5): attempts after a failed request (exponential backoff).

The secret is read each time a client is made and kept only inside the SDK's
credential object: :class:`AzureSiteConfig` holds where it is, so the site's
path (stored in the vault, shown in messages and logs) never carries it.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)

from siterecovery.domain.errors import (
    DiskError,
    InvalidInput,
    StorageCredentialsRefused,
    StorageUnreachable,
)

DEFAULT_CREDENTIAL = "env:AZURE_STORAGE_CONNECTION_STRING"
Credential = AzureNamedKeyCredential | AzureSasCredential


@dataclass(frozen=True, slots=True)
class AzureSiteConfig:
    """Where an ``azure-blob`` site keeps its page blobs (no secret in here)."""

    account_url: str
    """``https://ACCOUNT.blob.core.windows.net`` or ``http://HOST:PORT/ACCOUNT``."""
    account_name: str
    container: str
    credential_source: str = DEFAULT_CREDENTIAL
    """``file:PATH`` or ``env:NAME``: where the key or connection string is read."""
    retries: int = 5

    @classmethod
    def parse(cls, path: str) -> AzureSiteConfig:
        """The configuration of a site's ``path``; InvalidInput naming what is wrong."""
        url = urlsplit(path)
        segments = [s for s in url.path.split("/") if s]
        if url.scheme not in ("http", "https") or not url.hostname:
            raise _refused(path, "is not an http(s) URL of a blob container")
        path_style = _is_address(url.hostname)
        account_segments = 1 if path_style else 0
        if len(segments) != account_segments + 1:
            raise _refused(path, "must end with the container: ACCOUNT_URL/CONTAINER")
        account = segments[0] if path_style else url.hostname.split(".")[0]
        prefix = f"/{segments[0]}" if path_style else ""
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        source = query.get("credential", DEFAULT_CREDENTIAL)
        if not source.startswith(("file:/", "env:")):
            raise _refused(path, "credential= must be file:ABSOLUTE_PATH or env:NAME")
        retries = query.get("retries", "5")
        if not retries.isdigit():
            raise _refused(path, "retries= must be a whole number")
        return cls(
            account_url=f"{url.scheme}://{url.netloc}{prefix}",
            account_name=account,
            container=segments[-1],
            credential_source=source,
            retries=int(retries),
        )

    @property
    def container_url(self) -> str:
        return f"{self.account_url}/{self.container}"

    def describe_source(self) -> str:
        """Where the credentials come from, for messages (never their value)."""
        kind, _, where = self.credential_source.partition(":")
        return f"the file {where}" if kind == "file" else f"the environment variable {where}"

    def credential(self) -> Credential:
        """The SDK credential read from :attr:`credential_source`; InvalidInput
        (naming the source, not the secret) when it is missing or unsafe."""
        secret = self._read_secret().strip()
        if not secret:
            raise self._bad_source("is empty")
        if ";" in secret or secret.startswith(("AccountName=", "SharedAccessSignature=")):
            return self._from_connection_string(secret)
        return AzureNamedKeyCredential(self.account_name, secret)

    def _read_secret(self) -> str:
        kind, _, where = self.credential_source.partition(":")
        if kind == "env":
            value = os.environ.get(where)
            if value is None:
                raise self._bad_source("is not set")
            return value
        try:
            mode = Path(where).stat().st_mode
            if stat.S_IMODE(mode) & 0o077:
                raise self._bad_source("is readable by other users: chmod 600 it")
            return Path(where).read_text()
        except OSError as e:
            raise self._bad_source(f"cannot be read ({e.strerror})") from e

    def _from_connection_string(self, secret: str) -> Credential:
        fields = dict(part.split("=", 1) for part in secret.split(";") if "=" in part)
        if "AccountKey" in fields:
            return AzureNamedKeyCredential(fields.get("AccountName", self.account_name),
                                           fields["AccountKey"])  # fmt: skip
        if "SharedAccessSignature" in fields:
            return AzureSasCredential(fields["SharedAccessSignature"])
        raise self._bad_source("holds a connection string without AccountKey or SAS")

    def _bad_source(self, reason: str) -> InvalidInput:
        return InvalidInput(field="credential", reason=f"{self.describe_source()} {reason}")


def _is_address(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _refused(path: str, reason: str) -> InvalidInput:
    # The path holds no secret (only a reference to one): it may be shown.
    return InvalidInput(field="path", reason=f"azure-blob site path '{path}' {reason}")


@contextmanager
def translated(config: AzureSiteConfig, what: str, where: str) -> Iterator[None]:
    """Translate azure-core errors into the error tree, once, at this boundary.

    Refused credentials and an unreachable account get their own errors naming
    the account URL; anything else the service refuses is a DiskError naming the
    operation, the blob and the service's error code.
    """
    try:
        yield
    except ClientAuthenticationError as e:
        raise StorageCredentialsRefused(
            url=config.account_url, source=config.describe_source(), reason=_code(e)
        ) from e
    except (ServiceRequestError, ServiceResponseError) as e:
        raise StorageUnreachable(url=config.account_url, detail=_first_line(e)) from e
    except HttpResponseError as e:
        if e.status_code in (
            401,
            403,
        ):  # Azurite says AuthorizationFailure, Azure AuthenticationFailed.
            raise StorageCredentialsRefused(
                url=config.account_url, source=config.describe_source(), reason=_code(e)
            ) from e
        raise DiskError(detail=f"cannot {what} {where}: {_code(e)}: {_first_line(e)}") from e
    except AzureError as e:
        raise DiskError(detail=f"cannot {what} {where}: {_first_line(e)}") from e


def _code(error: HttpResponseError) -> str:
    code = getattr(error, "error_code", None) or error.status_code
    return str(getattr(code, "value", code) or type(error).__name__)


def _first_line(error: AzureError) -> str:
    message = str(error.message or error) if isinstance(error, AzureError) else str(error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__
