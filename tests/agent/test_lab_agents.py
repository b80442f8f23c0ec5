"""``make run``'s lab: the engine starts one agent per site on loopback and joins
them, so the lab's two sites exchange their bytes on the wire like real ones.

One daemon per test (``serve --lab`` with ``SITERECOVERY_LAB_AGENTS=1``, what
``make run`` gets by default); every process is stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery import __version__
from siterecovery.agent import state
from tests.conftest import Daemon

AGENTS = {"SITERECOVERY_LAB_AGENTS": "1"}
SRC = Path(__file__).resolve().parents[2] / "src"


def agent_pid(vault: Path, site: str) -> int:
    doc = json.loads((vault / "agents" / site / state.URL_FILE).read_text())
    return int(doc["pid"])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(what: str, condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.1)


@pytest.fixture
def lab(vault: Path) -> Iterator[Daemon]:
    """The lab as ``make run`` starts it; its VMs, engine and agents stopped after."""
    engine = Daemon(vault).start(lab=True, env=AGENTS)
    try:
        yield engine
    finally:
        if engine.process is not None and engine.process.poll() is not None:
            engine = Daemon(vault).start(lab=False, env=AGENTS)  # to stop the VMs
        engine.call("POST", "/lab/down")
        pids = [agent_pid(vault, s) for s in ("onprem", "cloud")]
        engine.stop()
        for pid in pids:  # a clean stop of the engine stops the lab's agents
            wait_until(f"agent {pid} to stop", lambda pid=pid: not alive(pid))


def site_list(vault: Path) -> list[dict[str, Any]]:
    """``siterecovery site list --json`` against the running daemon."""
    done = subprocess.run(
        [sys.executable, "-m", "siterecovery", "--vault", str(vault), "site", "list", "--json"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    found: list[dict[str, Any]] = json.loads(done.stdout)
    return found


def test_the_lab_is_two_agents_on_loopback_and_a_pass_crosses_the_wire(
    lab: Daemon, vault: Path
) -> None:
    sites = {s["name"]: s for s in site_list(vault)}
    assert set(sites) == {"onprem", "cloud"}
    for name, entry in sites.items():
        agent = entry["agent"]
        assert agent["url"].startswith("https://127.0.0.1:"), entry
        assert agent["reachable"] is True and agent["version"] == __version__, entry
        assert agent["fingerprint"] == state.load(vault / "agents" / name).fingerprint
        assert isinstance(agent["clock_offset"], float), entry
    # The VMs' disks are the onprem agent's, not the engine's.
    assert (vault / "agents" / "onprem" / "site" / "vms" / "web01").is_dir()
    assert not (vault / "sites").exists()

    job = lab.wait_job(lab.call("POST", "/items", json={"vm": "web01", "to": "cloud"})["job"])
    assert job["state"] == "succeeded", job.get("error")
    sync = next(s for s in job["steps"] if s["name"] == "initial-sync")["detail"]
    disk = sync["disks"]["d0"]
    assert disk["source_digest"] == disk["target_digest"], disk
    assert disk["bytes_on_wire"] >= disk["bytes_written"] > 0, disk
    chain = vault / "agents" / "cloud" / "site" / "replicas" / "web01" / "d0"
    assert [p.name for p in chain.iterdir()] == ["p000001.qcow2"]


def test_the_lab_agents_outlive_an_engine_crash_and_keep_their_ports(
    lab: Daemon, vault: Path
) -> None:
    urls = {s["name"]: s["agent"]["url"] for s in site_list(vault)}
    pids = {site: agent_pid(vault, site) for site in urls}
    lab.kill()  # SIGKILL: the agents, in sessions of their own, keep running
    assert all(alive(pid) for pid in pids.values())

    again = Daemon(vault).start(lab=True, env=AGENTS)
    lab.process, lab.client = again.process, again.client
    assert {site: agent_pid(vault, site) for site in urls} == pids  # found, not restarted
    assert {s["name"]: s["agent"]["url"] for s in site_list(vault)} == urls

    # A clean stop stops them; the next start starts them on the same ports.
    lab.stop()
    for pid in pids.values():
        wait_until(f"agent {pid} to stop", lambda pid=pid: not alive(pid))
    again = Daemon(vault).start(lab=True, env=AGENTS)
    lab.process, lab.client = again.process, again.client
    restarted = {site: agent_pid(vault, site) for site in urls}
    assert all(restarted[site] != pids[site] and alive(restarted[site]) for site in urls)
    entries = {s["name"]: s["agent"] for s in site_list(vault)}
    assert {name: entry["url"] for name, entry in entries.items()} == urls
    assert all(entry["reachable"] for entry in entries.values()), entries
    power = {(v["name"], v["site"]): v["power"] for v in lab.call("GET", "/vms")}
    assert power[("web01", "onprem")] == "running" and power[("db01", "onprem")] == "running"


def test_a_lab_agent_whose_port_is_taken_is_a_clear_error(vault: Path) -> None:
    engine = Daemon(vault).start(lab=True, env=AGENTS)
    url = next(s for s in site_list(vault) if s["name"] == "cloud")["agent"]["url"]
    engine.call("POST", "/lab/down")
    engine.stop()
    port = int(url.rsplit(":", 1)[1])
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen()
    try:
        with pytest.raises(RuntimeError) as failed:
            Daemon(vault).start(lab=True, env=AGENTS, timeout=90)
        said = str(failed.value)
        assert "AGENT_UNREACHABLE" in said or "agent of site 'cloud'" in said, said
        assert f"127.0.0.1:{port}" in said, said
    finally:
        squatter.close()
    for site in ("onprem", "cloud"):
        pid = agent_pid(vault, site) if (vault / "agents" / site / state.URL_FILE).exists() else 0
        if pid and alive(pid):
            os.kill(pid, signal.SIGTERM)
            wait_until(f"agent {pid} to stop", lambda pid=pid: not alive(pid))
