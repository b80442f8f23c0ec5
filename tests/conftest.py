"""Fixtures shared by the suite: a real daemon on a real vault, with the lab.

Everything a test starts is stopped at teardown: the daemon (SIGTERM, then
SIGKILL), every VM (qemu-storage-daemon + workload) and any process left
behind in the test's private run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

RUN_ROOT = Path(tempfile.gettempdir()) / f"srt-{os.getpid()}"


@pytest.fixture(autouse=True, scope="session")
def _short_run_dir() -> Iterator[None]:
    """Unix sockets live under a short private directory (107-byte path limit)."""
    os.environ["SITERECOVERY_RUN_DIR"] = str(RUN_ROOT)
    os.environ.setdefault("SITERECOVERY_WORKLOAD_RATE", "50")
    yield
    _kill_leftovers(RUN_ROOT)


def _kill_leftovers(root: Path) -> None:
    """SIGKILL any process whose command line mentions ``root`` (safety net)."""
    needle = str(root).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


class Daemon:
    """A ``siterecovery serve`` process on a vault, and an API client for it."""

    def __init__(self, vault: Path) -> None:
        self.vault = vault
        self.process: subprocess.Popen[bytes] | None = None
        self.client: httpx.Client | None = None

    def start(
        self, *, lab: bool = False, timeout: float = 180.0, env: dict[str, str] | None = None
    ) -> Daemon:
        """Start the daemon; ``env`` adds variables to its environment (e.g. a fault)."""
        (self.vault / "daemon.json").unlink(missing_ok=True)
        argv = [sys.executable, "-m", "siterecovery", "serve", "--vault", str(self.vault)]
        log = open(self.vault.parent / "daemon.out", "ab")  # noqa: SIM115 - kept by Popen
        self.process = subprocess.Popen(
            argv + (["--lab"] if lab else []),
            stdout=log,
            stderr=log,
            # The lab's sites in the engine's process unless a test asks for
            # agents (SITERECOVERY_LAB_AGENTS=1): faster to start.
            env={**os.environ, "SITERECOVERY_LAB_AGENTS": "0", **(env or {})},
        )
        deadline = time.monotonic() + timeout
        while not (self.vault / "daemon.json").exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError((self.vault.parent / "daemon.out").read_text()[-3000:])
            time.sleep(0.1)
        info = json.loads((self.vault / "daemon.json").read_text())
        token = (self.vault / "token").read_text().strip()
        self.client = httpx.Client(
            base_url=info["url"] + "/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=120.0,
        )
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON body of a successful call (raises with the body otherwise)."""
        assert self.client is not None
        response = self.client.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise AssertionError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json()

    def error(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        """Status and error body of a call expected to be refused."""
        assert self.client is not None
        response = self.client.request(method, path, **kwargs)
        assert response.status_code >= 400, response.text
        body: dict[str, Any] = response.json()["error"]
        return response.status_code, body

    def wait_job(self, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.call("GET", f"/jobs/{job_id}/wait", params={"timeout": 10})
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
        raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    return tmp_path / "vault"


@pytest.fixture
def daemon(vault: Path) -> Iterator[Daemon]:
    """A daemon with the lab up; VMs and daemon stopped afterwards."""
    running = Daemon(vault).start(lab=True)
    yield running
    shut_down(running)


def shut_down(running: Daemon) -> None:
    """Stop a daemon started with the lab: its VMs (the lab's daemons and
    workloads), then the daemon, also when it is gone already."""
    if running.process is not None and running.process.poll() is None:
        try:
            running.call("POST", "/lab/down")
        finally:
            running.stop()
    _stop_vms(running.vault)


def _stop_vms(vault: Path) -> None:
    """Stop the lab's VMs through the provider even when the daemon is gone."""
    from siterecovery.daemon import open_context
    from siterecovery.services.lab import lab_down

    if (vault / "vault.sqlite").exists():
        ctx = open_context(vault)
        try:
            lab_down(ctx)
        finally:
            ctx.store.close()


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1 (Debian's package, run as ``postgres``).

    Yields the server URL without a database; :func:`postgres_db` makes one.
    """
    root = Path(tempfile.mkdtemp(prefix="srpg-"))
    shutil.chown(root, "postgres")
    port = _free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, str(PG_BIN / "initdb"), "-D", str(root / "data"), "-U", "postgres",
         "--auth=trust", "--no-sync"],
        check=True, capture_output=True,
    )  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    ctl = [*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(root / "data"), "-w"]
    subprocess.run([*ctl, "-o", options, "-l", str(root / "log"), "start"], check=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "stop"], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres: str) -> str:
    """A fresh, empty database on the session's server; its URL."""
    import sqlalchemy

    name = f"vault_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(f"{postgres}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return f"{postgres}/{name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


STABLE_ITEM_FIELDS = (
    "vm", "state", "active_site", "standby_site", "policy", "points", "cycles", "busy_job",
)  # fmt: skip


def vault_snapshot(daemon: Daemon, vault: Path) -> dict[str, Any]:
    """Everything a refused operation must leave as it was: every listing of
    the vault and the replica files (VM disks change as their guests write)."""
    items = [{k: i[k] for k in STABLE_ITEM_FIELDS} for i in daemon.call("GET", "/items")]
    vms = [
        (v["name"], v["site"], v["host"], v["disks"], v["power"])
        for v in daemon.call("GET", "/vms")
    ]
    replicas = sorted(
        (str(p.relative_to(vault)), p.stat().st_size)
        for p in (vault / "sites").glob("*/replicas/**/*")
        if p.is_file()
    )
    return {
        "sites": daemon.call("GET", "/sites"),
        "hosts": daemon.call("GET", "/hosts"),
        "vms": vms,
        "items": items,
        "points": {i["vm"]: daemon.call("GET", f"/items/{i['vm']}/points") for i in items},
        "jobs": [(j["id"], j["state"]) for j in daemon.call("GET", "/jobs")],
        "groups": daemon.call("GET", "/groups"),
        "plans": daemon.call("GET", "/plans"),
        "replicas": replicas,
    }
