"""Azurite (the Azure Storage emulator, blob service only) for the page-blob tests.

:func:`azurite` starts ``azurite-blob`` from ``.azurite/`` (``scripts/install.sh``
installs it there) on 127.0.0.1 on a free port, in memory, without telemetry,
waits until it answers, and yields an :class:`Azurite` (its account URL, the
well-known development account and key). The process is killed at teardown,
also when the test failed. Tests skip when Azurite is not installed, except in
CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from siterecovery.domain.model import Site, SiteRole

ROOT = Path(__file__).resolve().parents[2]
AZURITE_BLOB = ROOT / ".azurite" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""The development account's key: public, the same in every Azurite."""


@dataclass(frozen=True, slots=True)
class Azurite:
    port: int

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.account_url};"
        )


def azure_site(service: Azurite, directory: Path, *, key: str = KEY, name: str = "dr") -> Site:
    """A site on a fresh container of ``service``; its key in a 0600 file in ``directory``."""
    key_file = directory / f"{name}-{uuid.uuid4().hex[:8]}.key"
    key_file.touch(mode=0o600)
    key_file.write_text(key)
    container = f"t{uuid.uuid4().hex[:20]}"
    path = f"{service.account_url}/{container}?credential=file:{key_file}&retries=1"
    return Site(name=name, provider="azure-blob", path=path, role=SiteRole.CLOUD)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def azurite(workspace: Path) -> Iterator[Azurite]:
    """A running Azurite blob service; killed (its process group) on exit."""
    if not AZURITE_BLOB.exists():
        missing = f"Azurite is not installed at {AZURITE_BLOB} (scripts/install.sh)"
        if os.environ.get("CI"):
            pytest.fail(missing)  # CI installs it: a silent skip would hide the loss.
        pytest.skip(missing)
    workspace.mkdir(parents=True, exist_ok=True)
    with (workspace / "azurite.log").open("wb") as log:
        for _ in range(3):  # Another process may take the free port first.
            port = _free_port()
            process = _start(port, workspace, log)
            try:
                if _started(process, port):
                    yield Azurite(port=port)
                    return
            finally:
                _kill(process)
        output = (workspace / "azurite.log").read_text(errors="replace")
        raise RuntimeError(f"Azurite did not start (3 tries): {output[-2000:]}")


def _start(port: int, workspace: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    command = [
        str(AZURITE_BLOB), "--blobHost", "127.0.0.1", "--blobPort", str(port),
        "--inMemoryPersistence", "--disableTelemetry", "--silent",
        "--skipApiVersionCheck",
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=workspace, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _started(process: subprocess.Popen[bytes], port: int) -> bool:
    """Whether ``process`` answers on ``port`` within 30 s (False: it exited)."""
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        if _answers(port):
            return process.poll() is None
        time.sleep(0.1)
    return False


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
