"""The seed's lifecycle with each site behind its own agent process: a drill,
``verify``, a failover, a delta failback (both phases), commit, reprotect,
a full failback and ``disable`` — every byte between sites goes agent to
agent, each checksum is computed next to its disk, and the engine reads none
of the disks.

Data is checked from the disks themselves: ``vm check`` runs the guest
journal check at the site of the image, and the jobs' integrity proofs are
whole-disk digests computed by each agent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.agent.conftest import Agent, io_counters
from tests.conftest import Daemon
from tests.failover.support import check, failover, item, job, step

MiB = 1 << 20
Sites = tuple[Daemon, Agent, Agent]


def _protect(engine: Daemon, vm: str, **policy: Any) -> dict[str, Any]:
    created = engine.call(
        "POST", "/vms", json={"name": vm, "host": "onprem-hv", "disks": [64 * MiB]}
    )
    assert created["site"] == "onprem" and created["power"] == "running"
    done = job(
        engine,
        engine.call("POST", "/items", json={"vm": vm, "to": "cloud", "interval": "1h", **policy}),
    )
    engine.call("POST", f"/items/{vm}/replicate", json={"app_consistent": True})
    return done


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_drill_verify_failover_and_delta_failback_through_agents(sites: Sites) -> None:
    engine, onprem, cloud = sites
    assert engine.process is not None
    before = io_counters(engine.process.pid)
    _protect(engine, "app01")

    # A drill at the recovery site: a VM on the latest point, checked there.
    drill = job(engine, failover(engine, "app01", type="test", point="latest"))
    drill_vm = step(drill, "create-test-vm")
    assert drill_vm["name"] == "app01-test" and drill_vm["site"] == "cloud"
    assert (cloud.dir / "site" / "vms" / "app01-test" / "disks" / "d0.qcow2").exists()
    report = check(engine, "app01-test", "cloud")
    assert report["image"] == "point-in-time view of the running VM" and report["last_seq"] > 0
    job(engine, engine.call("POST", "/items/app01/cleanup-test", json={}))
    assert not (cloud.dir / "site" / "vms" / "app01-test").exists()

    # verify: each agent hashes its side, only the digest lists cross. The
    # stopped VM equals its last point; once it runs again, they differ.
    engine.call("POST", "/vms/app01/stop", params={"site": "onprem"})
    engine.call("POST", "/items/app01/replicate", json={})
    verified = engine.call("GET", "/items/app01/verify")
    assert verified["other"].startswith("point ") and verified["disks"]["d0"]["blocks"] == 1024
    assert verified["equal"] is True and verified["disks"]["d0"]["differing_blocks"] == 0
    engine.call("POST", "/vms/app01/start", params={"site": "onprem"})
    time.sleep(0.5)  # the guest writes
    verified = engine.call("GET", "/items/app01/verify")
    assert verified["equal"] is False and verified["disks"]["d0"]["differing_blocks"] > 0

    # Unplanned failover to the cloud site, then commit.
    done = job(engine, failover(engine, "app01", type="unplanned", point="latest"))
    assert step(done, "stop-source")["stopped"] == "app01@onprem"
    assert item(engine, "app01")["state"] == "failed-over"
    assert engine.call("GET", "/vms/app01", params={"site": "cloud"})["power"] == "running"
    check(engine, "app01", "cloud")
    job(engine, engine.call("POST", "/items/app01/commit", json={}))
    time.sleep(1.0)  # the app keeps writing at the cloud site

    # Delta failback: phase 1 while the cloud VM runs, phase 2 after `complete`.
    plan = failover(engine, "app01", type="planned", sync="delta", dry_run=True)
    assert plan["ok"] and plan["bytes_note"].startswith("tracked"), plan
    assert 0 < plan["bytes_to_move"] < 64 * MiB
    started = failover(engine, "app01", type="planned", sync="delta")
    waiting = job(engine, started, "awaiting-completion")
    phase1 = step(waiting, "phase1-sync")
    assert phase1["disks"]["d0"]["mode"] == "tracked" and phase1["bytes_read"] < 64 * MiB
    status, error = engine.error("POST", "/vms/app01/start", params={"site": "onprem"})
    assert (status, error["code"]) == (409, "VM_INCONSISTENT")
    engine.call("POST", f"/jobs/{started['job']}/complete")
    done = job(engine, started)
    integrity = done["result"]["integrity"]
    assert integrity["equal"] is True and integrity["source_digest"] == integrity["target_digest"]
    last = step(done, "stop-source")["acknowledged_seq"]
    assert check(engine, "app01", "onprem")["last_seq"] >= last  # zero data loss
    assert (onprem.dir / "site" / "vms" / "app01" / "disks" / "d0.qcow2").exists()
    assert item(engine, "app01")["direction"] == "onprem -> cloud"

    # Commit deletes the cloud VM (at the cloud agent); reprotect from a common base.
    job(engine, engine.call("POST", "/items/app01/commit", json={}))
    assert not (cloud.dir / "site" / "vms" / "app01").exists()
    reprotected = job(engine, engine.call("POST", "/items/app01/reprotect", json={}))
    sync = step(reprotected, "initial-sync")["disks"]["d0"]
    assert sync["mode"] == "checksum" and sync["bytes_written"] < 64 * MiB
    assert sync["source_digest"] == sync["target_digest"]
    pass_ = engine.call("POST", "/items/app01/replicate", json={"app_consistent": True})
    assert pass_["disks"]["d0"]["mode"] == "tracked"
    point = pass_["point"]["id"]
    assert engine.call("GET", "/vms/app01/check", params={"point": point})["consistent"]

    # The engine read no disk: its reads are a small fraction of one disk.
    read = io_counters(engine.process.pid)["rchar"] - before["rchar"]
    assert read < 32 * MiB, read
    assert not [f for f in _files(engine.vault) if f.endswith(".qcow2")]


def test_planned_failover_full_failback_and_disable_through_agents(sites: Sites) -> None:
    engine, onprem, cloud = sites
    _protect(engine, "db01", verify_points=True)
    done = job(engine, failover(engine, "db01", type="planned"))
    final = step(done, "final-replication")["disks"]["d0"]
    assert final["source_digest"] == final["target_digest"]
    check(engine, "db01", "cloud")
    job(engine, engine.call("POST", "/items/db01/commit", json={}))

    done = job(engine, failover(engine, "db01", type="planned", sync="full"))
    download = step(done, "full-download")["disks"]["d0"]
    assert download["mode"] == "full" and download["bytes_hashed"] == 0
    assert done["result"]["integrity"]["equal"] is True
    last = step(done, "stop-source")["acknowledged_seq"]
    assert check(engine, "db01", "onprem")["last_seq"] >= last
    assert (onprem.dir / "site" / "vms" / "db01" / "disks" / "d0.qcow2").exists()
    job(engine, engine.call("POST", "/items/db01/commit", json={}))
    job(engine, engine.call("POST", "/items/db01/reprotect", json={}))
    assert item(engine, "db01")["state"] == "protected"

    chains = cloud.dir / "site" / "replicas" / "db01"
    assert any(chains.rglob("p*.qcow2"))
    disabled = engine.call("POST", "/items/db01/disable")
    assert disabled["state"] == "disabled" and disabled["kept_replica_files"] == []
    assert not chains.exists()
