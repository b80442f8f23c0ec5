"""The engine daemon: REST API, durable jobs and the replication scheduler.

``serve`` opens the vault, launches DBOS (which resumes interrupted jobs),
starts the scheduler (which resumes replication of every protected item) and
the monitor of agent sites (``sites/health.py``: their health, probed every
10 s, is what ``GET /sites`` and the items show), and serves the API. It
writes ``daemon.json`` (URL, pid) next to the vault's ``token``; the CLI finds
it there.

Vault directory::

    VAULT/config.json     {"db_url": ...}  (SQLite file below unless set)
    VAULT/vault.sqlite    the vault database (Alembic-managed schema)
    VAULT/dbos.sqlite     DBOS system database (workflow and step records); on a
                          PostgreSQL vault, the schema ``dbos`` of the same database
    VAULT/token           API token
    VAULT/master.key      the master key wrapping every key's material (keys/master.py)
    VAULT/daemon.json     {"url", "pid"} while a daemon runs
    VAULT/logs/daemon.log the daemon's log
    VAULT/agents/NAME/    the lab's site agents (``serve --lab``: agent/local.py),
                          their logs in VAULT/logs/agent-NAME.log
    VAULT/sites/NAME/     site directories of a lab served in this process

The directory and ``logs/`` are 0700, every file above 0600 whatever the
umask: :func:`secure_vault` sets them on every open, and the daemon runs with
umask 077. SQLite creates ``-wal``/``-shm`` with its database's mode.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import make_url

from siterecovery.context import Context

if TYPE_CHECKING:
    from siterecovery.agent.local import LocalAgents
from siterecovery.keys.master import MasterKey, write_private
from siterecovery.store.keys import open_keys
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


PRIVATE_FILES = ("config.json", "token", "master.key", "master.key.new", "master.lock",
                 "daemon.json", "vault.sqlite*", "dbos.sqlite*", "logs/daemon.log*")  # fmt: skip
"""What :func:`secure_vault` makes 0600 (globs, relative to the vault)."""


def secure_vault(vault: Path) -> None:
    """Vault directory and ``logs/`` 0700, its secret files 0600 (an older vault,
    or files made under a loose umask)."""
    vault.chmod(0o700)
    if (vault / "logs").is_dir():
        (vault / "logs").chmod(0o700)
    for pattern in PRIVATE_FILES:
        for path in vault.glob(pattern):
            path.chmod(0o600)


def _touch_private(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (SQLite opens an
    empty file as a new database, and gives its -wal/-shm files the same mode)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def init_vault(vault: Path, *, db_url: str | None = None) -> dict[str, Any]:
    """Create (or upgrade) a vault directory: config, token, master key, schema;
    keys of an older vault wrapped; modes as :func:`secure_vault`. Idempotent."""
    vault = vault.absolute()
    vault.mkdir(parents=True, exist_ok=True, mode=0o700)
    secure_vault(vault)
    config = vault / "config.json"
    if db_url or not config.exists():
        write_private(config, (json.dumps({"db_url": db_url}, indent=2) + "\n").encode())
    token = vault / "token"
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    if vault_url(vault).startswith("sqlite"):
        _touch_private(vault / "vault.sqlite")
        _touch_private(vault / "dbos.sqlite")
    store = VaultStore(vault_url(vault))
    try:
        open_keys(store, master=MasterKey(vault))
    finally:
        store.close()
    secure_vault(vault)
    shown = make_url(vault_url(vault)).render_as_string(hide_password=True)
    return {"vault": str(vault), "db_url": shown, "token": str(token)}


def open_context(vault: Path) -> Context:
    return Context(vault_dir=vault.absolute(), store=VaultStore(vault_url(vault)))


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Redact(logging.Filter):
    """Replaces the API token in every record a handler writes (a belt: no code
    logs it, but a foreign library's message might quote a header)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._secret in message:
            record.msg, record.args = message.replace(self._secret, "[redacted]"), ()
        return True


def _logging(vault: Path, *, token: str) -> None:
    logs = vault / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    logs.chmod(0o700)
    _touch_private(logs / "daemon.log")
    (logs / "daemon.log").chmod(0o600)
    handlers: list[logging.Handler] = [
        logging.FileHandler(logs / "daemon.log"),
        logging.StreamHandler(),
    ]
    for handler in handlers:
        handler.addFilter(_Redact(token))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
    )
    # One line per agent call is noise (a pass makes dozens); failures are ours to log.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _lab_agents(vault: Path) -> LocalAgents | None:
    """The lab's agent processes (``VAULT/agents``), unless ``SITERECOVERY_LAB_AGENTS=0``
    asks for sites served in this process."""
    from siterecovery.agent.local import LocalAgents

    if os.environ.get("SITERECOVERY_LAB_AGENTS", "1") == "0":
        return None
    return LocalAgents(vault / "agents", vault / "logs")


def serve(
    vault: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    lab: bool = False,
    lab_provider: str = "local",
) -> None:
    """Run the daemon until SIGINT/SIGTERM. VMs keep running after it stops.
    With ``lab``, the lab comes up first, its hosts per ``lab_provider``."""
    import uvicorn

    from siterecovery.api.app import create_app
    from siterecovery.jobs.runtime import JobRuntime
    from siterecovery.replication.scheduler import Scheduler
    from siterecovery.services import agents
    from siterecovery.services.lab import lab_up, start_agents

    os.umask(0o077)  # everything the daemon and its children create is private
    vault = vault.absolute()
    init_vault(vault)
    token = (vault / "token").read_text().strip()
    _logging(vault, token=token)
    ctx = open_context(vault)
    lab_agents = _lab_agents(vault) if lab else None
    if lab_agents is not None:
        try:
            start_agents(ctx, lab_agents)  # before the jobs resume: they call them
        except BaseException:
            lab_agents.stop()
            ctx.store.close()
            raise
    runtime = JobRuntime(ctx, system_database_url=system_database_url(vault))
    runtime.start()
    scheduler = Scheduler(ctx)
    sock = _bind(host, port)
    url = f"http://{host}:{sock.getsockname()[1]}"
    info = vault / "daemon.json"
    try:
        if lab:
            lab_up(ctx, agents=lab_agents, provider=lab_provider)
        scheduler.start()
        agents.start_monitor(ctx)
        write_private(info, (json.dumps({"url": url, "pid": os.getpid()}) + "\n").encode())
        print(
            f"siterecovery daemon on {url} (API docs {url}/docs, token in {vault / 'token'})",
            file=sys.stderr,
            flush=True,
        )
        app = create_app(ctx, runtime, token=token)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        # uvicorn stops on SIGTERM, then raises it again with the handler it
        # found: ours turns it into SystemExit, so the clean-up below runs
        # (the default action would end the process on the spot).
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        server.run(sockets=[sock])
    finally:
        info.unlink(missing_ok=True)
        agents.stop_monitor(ctx)
        scheduler.stop()
        runtime.stop()
        if lab_agents is not None:
            lab_agents.stop()
        ctx.store.close()
