"""The engine daemon: REST API, durable jobs and the replication scheduler.

``serve`` opens the vault, launches DBOS (which resumes interrupted jobs),
starts the scheduler (which resumes replication of every protected item) and
serves the API. It writes ``daemon.json`` (URL, pid) next to the vault's
``token``; the CLI finds it there.

Vault directory::

    VAULT/config.json     {"db_url": ...}  (SQLite file below unless set)
    VAULT/vault.sqlite    the vault database (Alembic-managed schema)
    VAULT/dbos.sqlite     DBOS system database (workflow and step records); on a
                          PostgreSQL vault, the schema ``dbos`` of the same database
    VAULT/token           API token (mode 0600)
    VAULT/daemon.json     {"url", "pid"} while a daemon runs
    VAULT/sites/NAME/     site directories of the lab
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

from siterecovery.services.context import Context
from siterecovery.store.repo import VaultStore

log = logging.getLogger("siterecovery")


def vault_url(vault: Path) -> str:
    config = vault / "config.json"
    if config.exists():
        url = json.loads(config.read_text()).get("db_url")
        if url:
            return str(url)
    return f"sqlite:///{vault.absolute() / 'vault.sqlite'}"


def system_database_url(vault: Path) -> str:
    """DBOS's system database: the vault's PostgreSQL server (schema ``dbos``)
    when the vault is on PostgreSQL, else ``VAULT/dbos.sqlite``."""
    url = vault_url(vault)
    if url.startswith("postgresql"):
        return "postgresql://" + url.split("://", 1)[1]
    return f"sqlite:///{vault.absolute() / 'dbos.sqlite'}"


def init_vault(vault: Path, *, db_url: str | None = None) -> dict[str, Any]:
    """Create (or upgrade) a vault directory. Idempotent."""
    vault = vault.absolute()
    vault.mkdir(parents=True, exist_ok=True)
    config = vault / "config.json"
    if db_url or not config.exists():
        config.write_text(json.dumps({"db_url": db_url}, indent=2) + "\n")
    token = vault / "token"
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    store = VaultStore(vault_url(vault))
    store.close()
    shown = make_url(vault_url(vault)).render_as_string(hide_password=True)
    return {"vault": str(vault), "db_url": shown, "token": str(token)}


def open_context(vault: Path) -> Context:
    return Context(vault_dir=vault.absolute(), store=VaultStore(vault_url(vault)))


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the whole new one, never a part."""
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _logging(vault: Path) -> None:
    (vault / "logs").mkdir(exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(vault / "logs" / "daemon.log"), logging.StreamHandler()],
    )


def serve(vault: Path, *, host: str = "127.0.0.1", port: int = 0, lab: bool = False) -> None:
    """Run the daemon until SIGINT/SIGTERM. VMs keep running after it stops."""
    import uvicorn

    from siterecovery.api.app import create_app
    from siterecovery.jobs.runtime import JobRuntime
    from siterecovery.replication.scheduler import Scheduler
    from siterecovery.services.lab import lab_up

    vault = vault.absolute()
    init_vault(vault)
    _logging(vault)
    ctx = open_context(vault)
    runtime = JobRuntime(ctx, system_database_url=system_database_url(vault))
    runtime.start()
    scheduler = Scheduler(ctx)
    sock = _bind(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}"
    token = (vault / "token").read_text().strip()
    info = vault / "daemon.json"
    try:
        if lab:
            lab_up(ctx)
        scheduler.start()
        _write_atomically(info, json.dumps({"url": url, "pid": os.getpid()}) + "\n")
        print(
            f"siterecovery daemon on {url} (API docs {url}/docs, token in {vault / 'token'})",
            file=sys.stderr,
            flush=True,
        )
        app = create_app(ctx, runtime, token=token)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        server.run(sockets=[sock])
    finally:
        info.unlink(missing_ok=True)
        scheduler.stop()
        runtime.stop()
        ctx.store.close()
