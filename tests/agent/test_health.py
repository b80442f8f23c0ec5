"""The health of agent sites: the daemon's cache, items at an unreachable site,
and the readiness check before a failover.

Real agents on 127.0.0.1 and a daemon that probes them every second
(``SITERECOVERY_AGENT_PROBE_INTERVAL``). A dead agent is a stopped one
(connections refused) or, for a cut link, a silent listener on its port: TCP
is accepted and TLS never answered, so a probe waits its whole timeout.
The monitor's own rules (``since``, one probe for concurrent readers, its
thread stopped) are checked first on a fake agent, without processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pytest

from siterecovery.agent import state
from siterecovery.agent.client import AgentInfo
from siterecovery.api.status import STATUS
from siterecovery.domain.errors import AgentUnreachable
from siterecovery.services.agents import INTERVAL_ENV
from siterecovery.sites.health import PROBE_TIMEOUT, HealthMonitor, Target
from tests.agent.conftest import START_TIMEOUT, Agent, join_site
from tests.agent.conftest import two_sites as joined_sites
from tests.conftest import Daemon
from tests.failover.support import item, protect

MiB = 1 << 20
INTERVAL = 1.0
SETTLE = 4 * (INTERVAL + PROBE_TIMEOUT) + 10
"""How long the cache may take to follow a change (a few rounds, generously)."""

T = TypeVar("T")


# The monitor on a fake agent ---------------------------------------------------------


class FakeAgent:
    """What ``connect`` gives the monitor: ``info()`` answers or raises, counted."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.up = True
        self.delay = delay
        self.calls = 0

    def info(self) -> AgentInfo:
        self.calls += 1
        time.sleep(self.delay)
        if not self.up:
            raise AgentUnreachable(site="far", url="https://far:1", detail="Connection refused")
        return AgentInfo(site="far", version="9", time=time.time(), fingerprint="f",
                         operations={}, round_trip=0.001, clock_offset=0.0)  # fmt: skip

    def close(self) -> None:
        pass


def _monitor(agent: FakeAgent, **kwargs: Any) -> HealthMonitor:
    target = Target(site="far", url="https://far:1", fingerprint="f")
    return HealthMonitor(lambda: [target], lambda _t, _timeout: agent, **kwargs)  # type: ignore[arg-type, return-value]


def test_since_is_when_the_state_began() -> None:
    agent = FakeAgent()
    monitor = _monitor(agent)
    target = Target(site="far", url="https://far:1", fingerprint="f")
    first = monitor.probe(target)
    assert first.reachable and first.since == first.checked_at and first.version == "9"
    again = monitor.probe(target)
    assert again.since == first.since and again.checked_at >= first.checked_at
    agent.up = False
    down = monitor.probe(target)
    assert not down.reachable and down.error == "AGENT_UNREACHABLE"
    assert down.since == down.checked_at and down.since >= again.checked_at
    assert "Connection refused" in str(down.message)
    latest = monitor.probe(target)
    assert latest.since == down.since and monitor.cached("far") == latest
    with pytest.raises(AgentUnreachable):
        monitor.require(target)


def test_concurrent_readers_of_a_site_never_probed_share_one_probe() -> None:
    agent = FakeAgent(delay=0.3)
    monitor = _monitor(agent)
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda _: monitor.current()["far"], range(4)))
    assert agent.calls == 1 and len({a.checked_at for a in answers}) == 1
    assert monitor.current()["far"] == answers[0] and agent.calls == 1  # fresh: from the cache


def test_the_thread_probes_every_interval_and_stops() -> None:
    agent = FakeAgent()
    monitor = _monitor(agent, interval=0.05)
    monitor.start()
    try:
        _until(lambda: agent.calls >= 3 or None, "three rounds", timeout=10)
    finally:
        monitor.stop()
    assert not [t for t in threading.enumerate() if t.name == "site-health"]
    calls = agent.calls
    time.sleep(0.2)
    assert agent.calls == calls


# Real agents and a daemon ------------------------------------------------------------


def _until(found: Callable[[], T | None], what: str, timeout: float = SETTLE) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value is not None:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def _port(agent: Agent) -> int:
    port = urlsplit(agent.url).port
    assert port is not None
    return port


def _start_on(agent: Agent, port: int) -> Agent:
    """Start ``agent`` again on ``port`` (``Agent.start`` takes any free one)."""
    info = agent.dir / state.URL_FILE
    info.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "siterecovery", "agent", "serve", "--dir", str(agent.dir),
            "--listen", f"127.0.0.1:{port}"]  # fmt: skip
    with open(agent.log, "ab") as log:
        agent.process = subprocess.Popen(
            argv, cwd=agent.cwd, env={**os.environ, "HOME": str(agent.home)},
            stdout=log, stderr=log,
        )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while not info.exists():
        if agent.process.poll() is not None or time.monotonic() > deadline:
            agent.stop()
            raise RuntimeError(agent.log.read_text()[-3000:])
        time.sleep(0.05)
    assert json.loads(info.read_text())["url"] == agent.url
    return agent


@contextmanager
def _silent(port: int) -> Iterator[socket.socket]:
    """A listener on ``port`` that accepts TCP and never answers (a hung agent)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    try:
        yield sock
    finally:
        sock.close()


def _engine(vault: Path) -> Daemon:
    return Daemon(vault).start(env={INTERVAL_ENV: str(INTERVAL)})


def _agent_of(engine: Daemon, site: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in engine.call("GET", "/sites") if s["name"] == site)
    return found["agent"]


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _sr(vault: Path, *args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "siterecovery", "--vault", str(vault), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.fixture
def north(tmp_path: Path) -> Iterator[tuple[Daemon, Agent]]:
    agent = Agent(tmp_path / "north", "north").init().start()
    engine = _engine(tmp_path / "vault")
    try:
        join_site(engine, agent, "cloud")
        yield engine, agent
    finally:
        engine.stop()
        agent.stop()


def test_sites_answer_from_the_cache_while_an_agent_hangs(north: tuple[Daemon, Agent]) -> None:
    engine, agent = north
    port = _port(agent)
    up = _agent_of(engine, "north")
    assert up["reachable"] is True and up["since"] and up["checked_at"]
    assert up["fingerprint"] == agent.fingerprint and up["url"] == agent.url

    agent.stop()
    with _silent(port):
        hung = f"within {PROBE_TIMEOUT:g} s"  # (a probe before it: refused)
        down = _until(
            lambda: a if hung in str((a := _agent_of(engine, "north"))["message"]) else None,
            "the monitor sees the hung agent",
        )
        assert down["reachable"] is False and down["error"] == "AGENT_UNREACHABLE"
        assert _when(down["since"]) >= _when(up["checked_at"])

        # Two requests at once behind the hung agent: both answered from the
        # cache. A probe made for a request would end PROBE_TIMEOUT s after it
        # at the earliest; the client's own timeout (15 s) is far beyond.
        asked = datetime.now().astimezone()
        with ThreadPoolExecutor(max_workers=2) as pool:
            answers = list(pool.map(lambda _: _agent_of(engine, "north"), range(2)))
        for answer in answers:
            assert answer["reachable"] is False and answer["since"] == down["since"]
            assert _when(answer["checked_at"]) < asked + timedelta(seconds=PROBE_TIMEOUT)
        listed = _sr(engine.vault, "site", "list")
        assert "unreachable since" in listed and "AGENT_UNREACHABLE" in listed

    _start_on(agent, port)
    back = _until(
        lambda: a if (a := _agent_of(engine, "north"))["reachable"] else None,
        "the restarted agent is reachable again in the cache",
    )
    assert _when(back["since"]) > _when(down["since"]) and back["error"] is None


@pytest.fixture
def two_sites(tmp_path: Path) -> Iterator[tuple[Daemon, Agent, Agent]]:
    """An engine probing every second and two joined agents, ``onprem`` and ``cloud``."""
    with joined_sites(tmp_path, env={INTERVAL_ENV: str(INTERVAL)}) as found:
        yield found


def _down(engine: Daemon, site: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        shown = item(engine, "app01")
        down = shown["site_unreachable"]
        return shown if down and down["site"] == site else None

    return _until(found, f"app01 shows site {site} unreachable")


def _refused(engine: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    status, error = engine.error("POST", "/items/app01/failover", json=body)
    assert (status, error["code"]) == (STATUS[AgentUnreachable.category], "AGENT_UNREACHABLE")
    return error


def test_an_unreachable_site_makes_items_critical_and_refuses_failovers(
    two_sites: tuple[Daemon, Agent, Agent],
) -> None:
    engine, onprem, cloud = two_sites
    engine.call("POST", "/vms", json={"name": "app01", "host": "onprem-hv", "disks": [64 * MiB]})
    protect(engine, "app01")
    assert item(engine, "app01")["site_unreachable"] is None
    cloud_port = _port(cloud)

    cloud.stop()
    shown = _down(engine, "cloud")
    down = shown["site_unreachable"]
    assert shown["health"] == "critical" and shown["state"] == "protected"
    assert (down["code"], down["url"]) == ("AGENT_UNREACHABLE", cloud.url) and down["since"]
    lines = _sr(engine.vault, "item", "show", "app01").splitlines()
    assert any(
        "critical: site 'cloud' unreachable since" in line and "(AGENT_UNREACHABLE)" in line
        for line in lines
    ), lines

    # Towards (or from) the dead site, every failover is refused before anything changes.
    jobs = [j["id"] for j in engine.call("GET", "/jobs")]
    for kind in ("planned", "test", "unplanned"):
        error = _refused(engine, {"type": kind})
        assert "'cloud'" in error["message"] and cloud.url in error["message"]
        assert f"the {kind} failover of app01 needs it" in error["message"]
        assert error["details"]["site"] == "cloud"
    plan = engine.call("POST", "/items/app01/failover", json={"type": "planned", "dry_run": True})
    assert not plan["ok"] and [c["name"] for c in plan["preconditions"]] == ["sites reachable"]
    assert plan["failed_preconditions"][0]["code"] == "AGENT_UNREACHABLE"
    assert [j["id"] for j in engine.call("GET", "/jobs")] == jobs
    after = item(engine, "app01")
    assert after["state"] == "protected" and after["active_site"] == "onprem"
    assert after["busy_job"] is None

    _start_on(cloud, cloud_port)
    _until(
        lambda: True if item(engine, "app01")["site_unreachable"] is None else None,
        "app01 no longer shows cloud unreachable",
    )

    # The source may be the disaster: an unplanned failover needs only its target.
    onprem_port = _port(onprem)
    onprem.stop()
    try:
        _down(engine, "onprem")
        plan = engine.call(
            "POST", "/items/app01/failover", json={"type": "unplanned", "dry_run": True}
        )
        assert plan["preconditions"][0] == {"name": "sites reachable", "ok": True}
        assert "'onprem'" in _refused(engine, {"type": "planned"})["message"]
        assert [j["id"] for j in engine.call("GET", "/jobs")] == jobs
    finally:
        _start_on(onprem, onprem_port)
