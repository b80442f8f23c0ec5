"""Races and crashes around one item, against the real daemon and lab.

Each test holds a job at an exact step (the fault hook of ``jobs/faults.py``,
``pause``) or kills the daemon there (``kill``), then does what a second user,
the scheduler or a restart would do, and checks what must hold: exactly one
operation owns an item, ``disable`` never races a job, a chain that backs a VM
is never deleted, a slow pass gives way, a replayed workflow takes its path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..conftest import Daemon, _stop_vms
from ..failover.support import check, failover, item, job, protect, step


def _replicas(vault: Path) -> list[tuple[str, int]]:
    return sorted(
        (str(p.relative_to(vault)), p.stat().st_size)
        for p in (vault / "sites").glob("*/replicas/**/*")
        if p.is_file()
    )


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never reached"
        time.sleep(0.05)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[Daemon, Path, Path]]:
    """A lab daemon whose unplanned failovers pause after start-target-vm."""
    vault, gate = tmp_path / "vault", tmp_path / "gate"
    gate.mkdir()
    env = {
        "SITERECOVERY_FAULT": "unplanned-failover:start-target-vm:after:pause",
        "SITERECOVERY_FAULT_GATE": str(gate),
    }
    daemon = Daemon(vault).start(lab=True, env=env)
    try:
        yield daemon, vault, gate
    finally:
        (gate / "unplanned-failover.start-target-vm.after.release").touch()
        _down(daemon, vault)


def _down(daemon: Daemon, vault: Path) -> None:
    try:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.call("POST", "/lab/down")
    finally:
        daemon.stop()
        _stop_vms(vault)


def test_concurrent_operations_on_one_item_exactly_one_wins(daemon: Daemon) -> None:
    protect(daemon, "web01")
    assert daemon.client is not None
    barrier = threading.Barrier(6)
    answers: list[httpx.Response] = []

    def fire() -> None:
        assert daemon.client is not None
        barrier.wait()
        answers.append(daemon.client.post("/items/web01/failover", json={"type": "test"}))

    threads = [threading.Thread(target=fire) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = [a for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code != 202]
    assert len(accepted) == 1, [a.text for a in answers]
    assert {a.status_code for a in refused} == {409}
    codes = {a.json()["error"]["code"] for a in refused}
    assert codes <= {"VM_BUSY", "TEST_FAILOVER_ACTIVE"}, codes
    job(daemon, accepted[0].json())
    assert len([j for j in daemon.call("GET", "/jobs") if j["kind"] == "test-failover"]) == 1


def test_disable_right_after_protect_is_refused_and_protect_completes(daemon: Daemon) -> None:
    answer = daemon.call("POST", "/items", json={"vm": "db01", "to": "cloud", "interval": "1h"})
    status, error = daemon.error("POST", "/items/db01/disable")
    assert status == 409 and error["code"] == "VM_BUSY"
    assert answer["job"] in error["message"]
    job(daemon, answer)
    shown = item(daemon, "db01")
    assert shown["state"] == "protected" and shown["points"] >= 1
    vault = daemon.vault
    assert any("replicas/db01" in name for name, _ in _replicas(vault))


def test_disable_never_races_a_failover_nor_deletes_a_backing_chain(
    gated: tuple[Daemon, Path, Path],
) -> None:
    daemon, vault, gate = gated
    protect(daemon, "web01")
    daemon.call("POST", "/items/web01/replicate", json={})
    started = failover(daemon, "web01", type="unplanned", point="latest")
    _wait_for(gate / "unplanned-failover.start-target-vm.after.reached")
    before = _replicas(vault)
    status, error = daemon.error("POST", "/items/web01/disable")
    assert status == 409 and error["code"] == "VM_BUSY", error
    assert started["job"] in error["message"]
    assert _replicas(vault) == before  # refused: nothing changed
    (gate / "unplanned-failover.start-target-vm.after.release").touch()
    job(daemon, started)
    job(daemon, daemon.call("POST", "/items/web01/commit", json={}))
    time.sleep(1.0)  # the failed-over VM writes on its overlay
    under_vm = [r for r in _replicas(vault) if r[0].startswith("sites/cloud/replicas/")]
    assert under_vm
    disabled = daemon.call("POST", "/items/web01/disable")
    assert disabled["state"] == "disabled"
    left = [r for r in _replicas(vault) if r[0].startswith("sites/cloud/replicas/")]
    assert left == under_vm, "the chain under the failed-over VM must stay"
    # The failed-over VM survives a stop and a start: its backing files are there.
    daemon.call("POST", "/vms/web01/stop", params={"site": "cloud"})
    daemon.call("POST", "/vms/web01/start", params={"site": "cloud"})
    report = check(daemon, "web01", "cloud")
    assert report["last_seq"] > 0


def test_a_slow_pass_gives_way_and_never_blocks_a_request(daemon: Daemon) -> None:
    protect(daemon, "db01")
    daemon.call("PATCH", "/items/db01", json={"max_rate": "32K"})
    time.sleep(2.0)  # the guest writes more than the cap moves in a moment
    assert daemon.client is not None
    outcome: dict[str, Any] = {}

    def slow_pass() -> None:
        assert daemon.client is not None
        outcome["pass"] = daemon.client.post("/items/db01/replicate", json={}, timeout=600)

    runner = threading.Thread(target=slow_pass)
    runner.start()
    deadline = time.monotonic() + 60
    while not _pass_running(daemon):
        assert time.monotonic() < deadline and runner.is_alive(), outcome
        time.sleep(0.05)
    # A second pass is refused at once, naming the holder; it never queues.
    status, error = daemon.error("POST", "/items/db01/replicate", json={})
    assert status == 409 and error["code"] == "VM_BUSY" and "replication pass" in error["message"]
    # A dry run answers while the pass runs.
    plan = failover(daemon, "db01", type="planned", dry_run=True)
    assert plan["operation"] == "planned-failover"
    # disable stops the pass at its next chunk and goes through.
    assert daemon.call("POST", "/items/db01/disable")["state"] == "disabled"
    runner.join(timeout=120)
    assert not runner.is_alive()
    assert outcome["pass"].status_code == 409, outcome["pass"].text
    assert outcome["pass"].json()["error"]["code"] == "PASS_PREEMPTED"
    assert item(daemon, "db01")["points"] == 0


def _pass_running(daemon: Daemon) -> bool:
    """A pass of db01 holds its item (the API refuses a second one)."""
    assert daemon.client is not None
    probe = daemon.client.post("/items/db01/replicate/probe")
    return probe.status_code == 404 and _owner_is_pass(daemon)


def _owner_is_pass(daemon: Daemon) -> bool:
    from siterecovery.store.repo import VaultStore

    store = VaultStore(f"sqlite:///{daemon.vault / 'vault.sqlite'}", migrate=False)
    try:
        owner, _claim = store.item_owner(vm="db01")
    finally:
        store.close()
    return bool(owner and owner.startswith("pass:"))


def test_a_failover_replayed_after_its_last_step_takes_the_same_path(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    env = {"SITERECOVERY_FAULT": "unplanned-failover:switch-direction:after:kill"}
    daemon = Daemon(vault).start(lab=True, env=env)
    try:
        protect(daemon, "web01")
        answer = failover(daemon, "web01", type="unplanned", point="latest")
        assert daemon.process is not None
        daemon.process.wait(timeout=180)  # the hook killed it after the step's body
        daemon = Daemon(vault).start()
        done = job(daemon, answer)
        names = [s["name"] for s in done["steps"]]
        assert "remove-previous-failover" not in names, names
        assert step(done, "switch-direction")["active_site"] == "cloud"
        shown = item(daemon, "web01")
        assert shown["state"] == "failed-over" and shown["active_site"] == "cloud"
        assert shown["busy_job"] is None
        check(daemon, "web01", "cloud")
    finally:
        _down(daemon, vault)
