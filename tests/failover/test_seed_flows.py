"""The two seed flows end to end on the lab, workloads running, data checked at
every step (``vm check`` from the disks themselves, digests in the jobs).

Each flow is one test: it stops at its first failure, like a runbook would.
"""

from __future__ import annotations

import time
from pathlib import Path

from siterecovery.disk.nbd import NbdDevice
from siterecovery.providers.local import journal
from siterecovery.providers.local.provider import LocalProvider

from ..conftest import Daemon
from .support import (
    check,
    failover,
    guest,
    item,
    job,
    protect,
    site,
    step,
    written_bytes,
)

GiB = 1 << 30


def _superblock(vault: Path, vm: str, where: str) -> journal.Superblock:
    run = LocalProvider().run_dir(site(vault, where), f"vm-{vm}")
    with NbdDevice.connect(run / "nbd.sock", "d0") as device:
        found = journal.read_superblock(device)
    assert found is not None
    return found


def _to_cloud_and_commit(daemon: Daemon, vm: str) -> None:
    """protect → unplanned failover → commit (the first half of the Hyper-V story)."""
    protect(daemon, vm)
    daemon.call("POST", f"/items/{vm}/replicate", json={"app_consistent": True})
    done = job(daemon, failover(daemon, vm, type="unplanned", point="latest"))
    assert step(done, "stop-source")["stopped"] == f"{vm}@onprem"
    assert item(daemon, vm)["state"] == "failed-over"
    assert item(daemon, vm)["direction"] == "cloud -> onprem"
    check(daemon, vm, "cloud")
    job(daemon, daemon.call("POST", f"/items/{vm}/commit", json={}))
    assert item(daemon, vm)["state"] == "committed"
    assert daemon.call("GET", f"/vms/{vm}", params={"site": "onprem"})["power"] == "stopped"


def test_hyperv_flow_failback_delta(daemon: Daemon, vault: Path) -> None:
    _to_cloud_and_commit(daemon, "web01")
    time.sleep(1.0)  # the app keeps writing at the cloud site
    before = check(daemon, "web01", "cloud")["last_seq"]

    plan = failover(daemon, "web01", type="planned", sync="delta", dry_run=True)
    assert plan["ok"] and plan["operation"] == "failback"
    assert 0 < plan["bytes_to_move"] < 64 << 20 and plan["bytes_note"].startswith("tracked")
    assert item(daemon, "web01")["state"] == "committed"  # a dry run changes nothing

    # Phase 1, with the guest held still so that we know where phase 1 stands.
    held = guest(vault, "web01", "cloud")
    first = held.quiesce(timeout=120)
    try:
        started = failover(daemon, "web01", type="planned", sync="delta")
        waiting = job(daemon, started, "awaiting-completion")
    finally:
        held.thaw()
    assert first >= before
    assert item(daemon, "web01")["state"] == "awaiting-completion"
    phase1 = step(waiting, "phase1-sync")
    assert phase1["bytes_read"] < 64 << 20 < GiB  # far below the 1 GiB disk
    assert phase1["disks"]["d0"]["mode"] == "tracked"
    # The target holds a half-finished sync: it refuses to start.
    status, error = daemon.error("POST", "/vms/web01/start", params={"site": "onprem"})
    assert (status, error["code"]) == (409, "VM_INCONSISTENT")

    time.sleep(1.0)  # writes after phase 1
    daemon.call("POST", f"/jobs/{started['job']}/complete")
    done = job(daemon, started)
    last = step(done, "stop-source")["acknowledged_seq"]
    assert last > first
    phase2 = done["result"]["phase2"]
    after_phase1 = written_bytes(_superblock(vault, "web01", "onprem"), first + 1, last)
    assert 0 < phase2["bytes"] <= 1.1 * after_phase1, (phase2, after_phase1)
    assert phase2["predicted_bytes"] > 0 and phase2["downtime_seconds"] > 0
    # Downtime runs from the source stopped to the target started: it holds the
    # whole phase-2 sync and the target's start, and not the source's stop.
    stopped, started_at = step(done, "stop-source"), step(done, "start-target")
    assert phase2["downtime_seconds"] == round(started_at["at"] - stopped["at"], 3)
    parts = phase2["downtime"]
    assert phase2["downtime_seconds"] >= parts["sync_seconds"] + parts["start_seconds"] - 0.01
    assert parts["stop_seconds"] == stopped["stop_seconds"]
    assert done["result"]["integrity"]["equal"] is True
    integrity = done["result"]["integrity"]
    assert integrity["source_digest"] == integrity["target_digest"]
    # Zero data loss: every record the cloud VM acknowledged is on-premises.
    assert check(daemon, "web01", "onprem")["last_seq"] >= last
    assert item(daemon, "web01")["direction"] == "onprem -> cloud"

    job(daemon, daemon.call("POST", "/items/web01/commit", json={}))
    assert not daemon.call("GET", "/vms", params={"site": "cloud"})  # deleted by commit
    reprotected = job(daemon, daemon.call("POST", "/items/web01/reprotect", json={}))
    sync = step(reprotected, "initial-sync")["disks"]["d0"]
    assert sync["mode"] == "checksum"  # a common base: only differing blocks
    assert sync["bytes_written"] < 64 << 20
    assert sync["source_digest"] == sync["target_digest"]
    assert item(daemon, "web01")["state"] == "protected"
    report = daemon.call("POST", "/items/web01/replicate", json={"app_consistent": True})
    point = report["point"]
    assert report["disks"]["d0"]["mode"] == "tracked"
    assert daemon.call("GET", "/vms/web01/check", params={"point": point["id"]})["consistent"]


def test_hyperv_flow_failback_full(daemon: Daemon, vault: Path) -> None:
    _to_cloud_and_commit(daemon, "db01")
    time.sleep(1.0)
    plan = failover(daemon, "db01", type="planned", sync="full", dry_run=True)
    assert plan["ok"] and "full download" in plan["bytes_note"] and plan["bytes_to_move"] > 0
    done = job(daemon, failover(daemon, "db01", type="planned", sync="full"))
    download = step(done, "full-download")["disks"]["d0"]
    assert download["mode"] == "full" and download["bytes_hashed"] == 0  # no checksums
    assert done["result"]["integrity"]["equal"] is True
    assert done["result"]["phase2"]["downtime_seconds"] > 0
    last = step(done, "stop-source")["acknowledged_seq"]
    assert check(daemon, "db01", "onprem")["last_seq"] >= last
    job(daemon, daemon.call("POST", "/items/db01/commit", json={}))
    job(daemon, daemon.call("POST", "/items/db01/reprotect", json={}))
    assert item(daemon, "db01")["state"] == "protected"


def test_hyperv_flow_to_an_alternate_host_with_create_vm(daemon: Daemon, vault: Path) -> None:
    daemon.call(
        "POST", "/hosts", json={"site": "onprem", "name": "hv02", "switches": ["vswitch-prod"]}
    )
    _to_cloud_and_commit(daemon, "db01")
    daemon.call("DELETE", "/vms/db01", params={"site": "onprem"})  # the original VM is lost
    status, error = daemon.error(
        "POST", "/items/db01/failover", json={"type": "planned", "host": "hv02"}
    )
    assert (status, error["code"]) == (409, "TARGET_VM_MISSING")
    assert "--create-vm" in error["message"]
    body = {"type": "planned", "sync": "full", "host": "hv02", "create_vm": True}
    done = job(daemon, failover(daemon, "db01", **body))
    assert step(done, "prepare-target")["created"] is True
    assert done["result"]["integrity"]["equal"] is True
    vm = daemon.call("GET", "/vms/db01", params={"site": "onprem"})
    assert (vm["host"], vm["power"]) == ("hv02", "running")
    check(daemon, "db01", "onprem")


def test_vmware_flow(daemon: Daemon, vault: Path) -> None:
    protect(daemon, "web01")
    daemon.call("POST", "/items/web01/replicate", json={"app_consistent": True})
    # Planned failover: zero data loss.
    done = job(daemon, failover(daemon, "web01", type="planned"))
    acked = step(done, "stop-source")["acknowledged_seq"]
    point = done["result"]["zero_data_loss"]["point"]
    assert daemon.call("GET", "/vms/web01/check", params={"point": point})["last_seq"] == acked
    assert check(daemon, "web01", "cloud")["last_seq"] >= acked
    job(daemon, daemon.call("POST", "/items/web01/commit", json={}))

    # Reprotect cloud -> onprem: the on-premises VM's disk is the common base.
    plan = daemon.call("POST", "/items/web01/reprotect", json={"dry_run": True})
    assert plan["ok"] and "checksums" in plan["bytes_note"]
    reprotected = job(daemon, daemon.call("POST", "/items/web01/reprotect", json={}))
    assert step(reprotected, "adopt-base")["base"] == "VM web01 at onprem"
    sync = step(reprotected, "initial-sync")["disks"]["d0"]
    assert sync["mode"] == "checksum" and sync["bytes_written"] < 64 << 20
    assert item(daemon, "web01")["direction"] == "cloud -> onprem"
    time.sleep(0.5)
    app = daemon.call("POST", "/items/web01/replicate", json={"app_consistent": True})["point"]
    time.sleep(0.5)
    crash = daemon.call("POST", "/items/web01/replicate", json={"app_consistent": False})["point"]
    assert crash["seq"] > app["seq"]

    # Fail back to the latest app-consistent point: data after it is lost, nothing before.
    body = {"type": "unplanned", "point": "latest-app-consistent"}
    done = job(daemon, failover(daemon, "web01", **body))
    assert item(daemon, "web01")["failover"]["point"] == app["id"]
    home = check(daemon, "web01", "onprem")
    assert home["last_seq"] >= app["workload_seq"]
    job(daemon, daemon.call("POST", "/items/web01/commit", json={}))
    assert not daemon.call("GET", "/vms", params={"site": "cloud"})
    job(daemon, daemon.call("POST", "/items/web01/reprotect", json={}))
    assert item(daemon, "web01")["state"] == "protected"
    assert item(daemon, "web01")["direction"] == "onprem -> cloud"


def test_drill_never_pauses_protection(daemon: Daemon, vault: Path) -> None:
    protect(daemon, "web01")
    point = daemon.call("POST", "/items/web01/replicate", json={})["point"]
    drill = job(daemon, failover(daemon, "web01", type="test", switch="drill-net"))
    assert drill["result"]["drill"]["vm"] == "web01-test"
    # The drill's RTO covers making the VM on the point and starting it.
    created, started = step(drill, "create-test-vm"), step(drill, "start-test-vm")
    rto = drill["result"]["drill"]["rto_seconds"]
    assert rto == round(started["at"] - created["at"], 3)
    assert rto >= started["start_seconds"]
    test_vm = daemon.call("GET", "/vms/web01-test", params={"site": "cloud"})
    assert test_vm["nics"] == ["drill-net"] and test_vm["power"] == "running"
    check(daemon, "web01-test", "cloud")
    # Replication goes on while the drill runs, and the drill's point stays put.
    after = daemon.call("POST", "/items/web01/replicate", json={})["point"]
    assert after["seq"] > point["seq"] and item(daemon, "web01")["state"] == "protected"
    status, error = daemon.error("POST", "/items/web01/failover", json={"type": "test"})
    assert (status, error["code"]) == (409, "TEST_FAILOVER_ACTIVE")
    job(daemon, daemon.call("POST", "/items/web01/cleanup-test"))
    assert not daemon.call("GET", "/vms", params={"site": "cloud"})
    assert item(daemon, "web01")["drill"] is None


def test_unplanned_failover_rerun_with_an_older_point(daemon: Daemon, vault: Path) -> None:
    protect(daemon, "db01")
    older = daemon.call("POST", "/items/db01/replicate", json={"app_consistent": True})["point"]
    time.sleep(0.5)
    daemon.call("POST", "/items/db01/replicate", json={"app_consistent": True})
    job(daemon, failover(daemon, "db01", type="unplanned", point="latest"))
    latest_seq = check(daemon, "db01", "cloud")["last_seq"]
    # Until commit, the failover may be re-run with another point.
    done = job(daemon, failover(daemon, "db01", type="unplanned", point=older["id"]))
    assert step(done, "remove-previous-failover")["deleted"] == "db01@cloud"
    assert item(daemon, "db01")["failover"]["point"] == older["id"]
    report = check(daemon, "db01", "cloud")
    assert older["workload_seq"] <= report["last_seq"]
    assert older["workload_seq"] < latest_seq
    job_json = daemon.call("GET", f"/jobs/{done['id']}")
    assert job_json["state"] == "succeeded" and "integrity" in job_json


def test_lab_up_restarts_only_the_live_copy(daemon: Daemon, vault: Path) -> None:
    protect(daemon, "web01")
    job(daemon, failover(daemon, "web01", type="unplanned"))
    daemon.call("POST", "/lab/up")
    power = {(v["name"], v["site"]): v["power"] for v in daemon.call("GET", "/vms")}
    assert power[("web01", "cloud")] == "running"
    assert power[("web01", "onprem")] == "stopped"  # no split brain
