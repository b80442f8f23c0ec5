"""The engine joins a real agent process as a site: `site add --agent --join`.

A daemon (``siterecovery serve``) on its own vault and an agent
(``siterecovery agent serve``) on 127.0.0.1: the join pins the agent's
certificate and keeps the engine's secret wrapped in the vault; ``GET /sites``
shows the agent's reachability, version and clock offset; every refused join
leaves the vault's sites as they were.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery import __version__
from tests.agent.conftest import Agent
from tests.conftest import Daemon


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Daemon]:
    running = Daemon(tmp_path / "vault").start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def north(tmp_path: Path) -> Iterator[Agent]:
    agent = Agent(tmp_path / "north", "north").init().start()
    yield agent
    agent.stop()


def _sites(engine: Daemon) -> dict[str, dict]:
    return {s["name"]: s for s in engine.call("GET", "/sites")}


def test_join_pins_the_agent_and_lists_it(engine: Daemon, north: Agent, tmp_path: Path) -> None:
    body = {"name": "north", "agent": north.url, "join": north.token(), "role": "cloud"}
    added = engine.call("POST", "/sites", json=body)
    assert (added["name"], added["provider"], added["path"]) == ("north", "agent", north.url)
    agent = _sites(engine)["north"]["agent"]
    assert agent["reachable"] is True and agent["version"] == __version__
    assert agent["url"] == north.url and agent["fingerprint"] == north.fingerprint
    assert abs(agent["clock_offset"]) < 1.0 and agent["round_trip"] > 0
    # The engine's secret is a vault key, wrapped: never in the clear in the vault.
    vault = sqlite3.connect(tmp_path / "vault" / "vault.sqlite")
    (material,) = vault.execute("SELECT material FROM keys WHERE name='agent-north'").fetchone()
    assert material.startswith("v1:")
    # The site's storage was prepared by the agent, inside its own directory.
    assert (north.dir / "site" / "replicas").is_dir() and (north.dir / "site" / "vms").is_dir()

    north.stop()
    # The daemon's health monitor notices at its next probe (bounded poll).
    deadline = time.monotonic() + 30
    down = _sites(engine)["north"]["agent"]
    while down["reachable"] and time.monotonic() < deadline:
        time.sleep(0.2)
        down = _sites(engine)["north"]["agent"]
    assert down["reachable"] is False and down["error"] == "AGENT_UNREACHABLE"


def test_refused_joins_change_nothing(engine: Daemon, north: Agent) -> None:
    before = _sites(engine)
    token = north.token()
    status, error = engine.error(
        "POST", "/sites", json={"name": "other", "agent": north.url, "join": token}
    )
    assert (status, error["code"]) == (400, "INVALID_INPUT") and "serves site 'north'" in str(
        error["message"]
    )
    # The token was spent by that refusal: a replay is refused by the agent.
    status, error = engine.error(
        "POST", "/sites", json={"name": "north", "agent": north.url, "join": token}
    )
    assert (status, error["code"]) == (401, "JOIN_TOKEN_REFUSED")
    status, error = engine.error(
        "POST", "/sites", json={"name": "north", "agent": north.url, "join": "srj1-bogus"}
    )
    assert error["code"] == "JOIN_TOKEN_REFUSED"
    status, error = engine.error("POST", "/sites", json={"name": "north", "agent": north.url})
    assert (status, error["code"]) == (400, "INVALID_INPUT")
    assert _sites(engine) == before
