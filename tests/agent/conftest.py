"""Real site agents: ``siterecovery agent serve`` processes on 127.0.0.1, port 0.

Each agent has its own directory, an empty working directory and an empty
HOME, so that a test can check it wrote nothing but its directory. Every
agent started is stopped at teardown (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from siterecovery.agent import state
from siterecovery.agent.client import AgentClient, Joined, join
from tests.conftest import Daemon

START_TIMEOUT = 30.0


@dataclass
class Result:
    code: int
    out: str
    err: str

    def doc(self) -> Any:
        return json.loads(self.out)


class Agent:
    """One agent: its directory, and its process while started."""

    def __init__(self, root: Path, site: str) -> None:
        self.site = site
        self.dir = root / "agent"
        self.cwd = root / "cwd"
        self.home = root / "home"
        self.log = root / "agent.out"
        for path in (self.cwd, self.home):
            path.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def cli(self, *args: str) -> Result:
        """``siterecovery ARGS`` run in the agent's cwd, with its HOME."""
        done = subprocess.run(
            [sys.executable, "-m", "siterecovery", *args],
            cwd=self.cwd,
            env={**os.environ, "HOME": str(self.home)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    def init(self) -> Agent:
        result = self.cli("agent", "init", "--dir", str(self.dir), "--site", self.site, "--json")
        assert result.code == 0, result.err
        return self

    def token(self, ttl: str = "1h") -> str:
        """A join token made with ``siterecovery agent token``."""
        result = self.cli("agent", "token", "--dir", str(self.dir), "--ttl", ttl, "--json")
        assert result.code == 0, result.err
        return str(result.doc()["token"])

    def quick_token(self, ttl: float = 3600.0) -> str:
        """A join token made in this process (what the command does, without its start-up)."""
        return state.new_token(self.dir, ttl)

    @property
    def cert_pem(self) -> str:
        return (self.dir / "agent.crt").read_text()

    @property
    def fingerprint(self) -> str:
        return state.load(self.dir).fingerprint

    def start(self) -> Agent:
        info = self.dir / state.URL_FILE
        info.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "siterecovery", "agent", "serve", "--dir", str(self.dir),
                "--listen", "127.0.0.1:0"]  # fmt: skip
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=self.cwd, env={**os.environ, "HOME": str(self.home)},
                stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not info.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(self.log.read_text()[-3000:])
            time.sleep(0.05)
        doc = json.loads(info.read_text())
        assert doc["pid"] == self.process.pid
        self.url = str(doc["url"])
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def join(self, token: str | None = None) -> Joined:
        return join(self.url, token or self.quick_token())

    def client(self, joined: Joined, **kwargs: Any) -> AgentClient:
        return AgentClient(self.url, joined.cert_pem, joined.secret, site=self.site, **kwargs)


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` (relative) and a file's bytes (None: a directory)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(directory.rglob("*")):
        found[str(path.relative_to(directory))] = None if path.is_dir() else path.read_bytes()
    return found


def settled(agent: Agent) -> dict[str, bytes | None]:
    """The agent directory's snapshot, apart from the file saying where it listens."""
    found = snapshot(agent.dir)
    found.pop(state.URL_FILE, None)
    return found


@pytest.fixture(scope="module")
def east(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    agent = Agent(tmp_path_factory.mktemp("east"), "east").init().start()
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def west(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    agent = Agent(tmp_path_factory.mktemp("west"), "west").init().start()
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def east_joined(east: Agent) -> Joined:
    return east.join()


@pytest.fixture
def east_client(east: Agent, east_joined: Joined) -> Iterator[AgentClient]:
    with east.client(east_joined) as client:
        yield client


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Agent]:
    """An initialised agent of site ``south``, not started."""
    agent = Agent(tmp_path, "south").init()
    yield agent
    agent.stop()


def io_counters(pid: int) -> dict[str, int]:
    """``/proc/PID/io``: what a process read and wrote (``rchar``, ``wchar``…)."""
    fields = (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {k: int(v) for k, v in fields}


def join_site(engine: Daemon, agent: Agent, role: str) -> None:
    """``site add`` of ``agent`` through the engine's API, and a host at the site."""
    body = {"name": agent.site, "agent": agent.url, "join": agent.token(), "role": role}
    engine.call("POST", "/sites", json=body)
    host = {"site": agent.site, "name": f"{agent.site}-hv", "switches": ["lan"]}
    engine.call("POST", "/hosts", json=host)


@contextmanager
def two_sites(
    root: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[Daemon, Agent, Agent]]:
    """An engine (started with ``env``) and two joined agents, ``onprem`` and
    ``cloud``, a host at each; their VMs stopped and all three stopped after."""
    onprem = Agent(root / "onprem", "onprem").init().start()
    cloud = Agent(root / "cloud", "cloud").init().start()
    engine = Daemon(root / "vault").start(env=env)
    try:
        join_site(engine, onprem, "on-premises")
        join_site(engine, cloud, "cloud")
        yield engine, onprem, cloud
    finally:
        for vm in engine.call("GET", "/vms"):
            engine.call("POST", f"/vms/{vm['name']}/stop", params={"site": vm["site"]})
        engine.stop()
        onprem.stop()
        cloud.stop()


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Daemon, Agent, Agent]]:
    """An engine and two joined agents, ``onprem`` and ``cloud``, a host at each."""
    with two_sites(tmp_path) as found:
        yield found
