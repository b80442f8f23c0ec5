"""The embedded lab's site agents: one ``siterecovery agent serve`` process per
site, on loopback, started by the engine that serves the lab.

``make run`` gives a newcomer two sites that behave like real ones: every
byte between them crosses the wire (TLS, windowed), each site's disks belong
to its own agent process. The agents live in ``VAULT/agents/NAME/`` (an agent
directory: identity, secrets, ``site/``) and log to ``VAULT/logs/agent-NAME.log``.

Processes: an agent runs in a session of its own, like a real site's agent
that the engine does not own: an engine killed uncleanly leaves its agents
(and their VMs) running, and the next engine finds them again by their
``agent-url.json`` (its pid alive, the URL the vault joined) instead of
starting a second one. A clean stop of the engine stops them (SIGTERM:
the agent's VMs keep running, as they do under a real agent's restart).

Ports: the first start takes a free loopback port; the vault then knows the
agent by that URL, so every later start asks for the same port (an error
naming it when it is taken).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from siterecovery import processes
from siterecovery.agent import state
from siterecovery.domain.errors import AgentUnreachable, InvalidInput

START_TIMEOUT = 60.0
"""Seconds a new agent has to say where it listens (a loaded host)."""
STOP_TIMEOUT = 10.0
"""Seconds a SIGTERMed agent has to end before it is killed."""
HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class LocalAgent:
    """A running lab agent: its site, directory, process id and URL."""

    site: str
    dir: Path
    pid: int
    url: str


class LocalAgents:
    """The lab's agent processes under ``root`` (``VAULT/agents``); logs in ``logs``."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root = root
        self.logs = logs
        self._started: dict[str, LocalAgent] = {}

    def directory(self, site: str) -> Path:
        return self.root / site

    def ensure(self, site: str, *, url: str | None = None) -> LocalAgent:
        """The agent of ``site`` running, at ``url`` when the vault already knows
        one (the same port), on any free port otherwise. Reuses an agent that
        already runs there. Idempotent."""
        directory = self.directory(site)
        directory.mkdir(parents=True, exist_ok=True)
        state.init(directory, site)
        running = _running(directory, site)
        if running is not None and (url is None or running.url == url.rstrip("/")):
            self._started[site] = running
            return running
        if running is not None:
            _terminate(running.pid)
        port = 0 if url is None else _port(url)
        agent = self._spawn(site, directory, port)
        self._started[site] = agent
        return agent

    def token(self, site: str) -> str:
        """A one-time join token of the agent of ``site`` (made in its directory)."""
        return state.new_token(self.directory(site), ttl=600.0)

    def stop(self) -> None:
        """SIGTERM every agent this object started or found, and wait. Idempotent."""
        for agent in self._started.values():
            _terminate(agent.pid)
        self._started.clear()

    def _spawn(self, site: str, directory: Path, port: int) -> LocalAgent:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"agent-{site}.log"
        state.remove_url(directory)
        argv = [sys.executable, "-m", "siterecovery", "agent", "serve", "--dir", str(directory),
                "--listen", f"{HOST}:{port}"]  # fmt: skip
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv, cwd=directory, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            found = _running(directory, site)
            if found is not None and found.pid == process.pid:
                return found
            if process.poll() is not None or time.monotonic() > deadline:
                if process.poll() is None:
                    _terminate(process.pid)
                said = _tail(log) or f"exit status {process.returncode}"
                raise AgentUnreachable(
                    site=site, url=f"https://{HOST}:{port}",
                    detail=f"the lab agent did not start ({log}: {said})",
                )  # fmt: skip
            time.sleep(0.05)


def _running(directory: Path, site: str) -> LocalAgent | None:
    """The agent serving ``directory`` per its ``agent-url.json``, if its process lives."""
    try:
        doc = json.loads((directory / state.URL_FILE).read_text())
        pid, url = int(doc["pid"]), str(doc["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _is_agent(pid, directory):
        return None
    return LocalAgent(site=site, dir=directory, pid=pid, url=url.rstrip("/"))


def _is_agent(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is alive (not a zombie) and is an agent serving ``directory``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not processes.alive(pid):
        return False
    return b"serve" in argv and str(directory).encode() in argv


def _terminate(pid: int) -> None:
    processes.terminate(pid, timeout=STOP_TIMEOUT)


def _port(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise InvalidInput(field="agent", reason=f"'{url}' has no port")
    return port


def _tail(log: Path, limit: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-limit:].strip()
    except OSError:
        return ""
