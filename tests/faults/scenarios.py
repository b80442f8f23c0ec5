"""The job types of the SIGKILL matrix: how to reach each job's starting state,
start it, re-run it, and what must hold once it has succeeded.

A scenario never names its steps: the matrix learns them by tracing a run of
the workflow itself (``SITERECOVERY_FAULT_TRACE``, see ``steps.json``).

Every check reads the VMs' own disks (``vm check``) and the guests' state
files: a record is *lost* when a guest acknowledged it (its ``workload.json``
at the source after it stopped, or the recovery point's quiesced seq for an
unplanned failover, which may lose what came after its point by design) and
the survivor's journal does not hold it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..conftest import Daemon

Facts = dict[str, Any]
VM = "web01"
PLAN_VMS = ("web01", "db01")


@dataclass(frozen=True)
class Scenario:
    """One job type: ``setup`` brings a fresh lab to the job's starting state
    (recording what the checks need in ``facts``), ``start`` starts the job and
    returns its id (``rerun`` is the repair after a failure, by default the same
    request), ``verify`` asserts the end state and returns the records lost."""

    name: str
    title: str
    setup: Callable[[Daemon, Facts], None]
    start: Callable[[Daemon, Facts], str]
    verify: Callable[[Daemon, Path, Facts, str], int]
    rerun: Callable[[Daemon, Facts], str] | None = None
    vms: tuple[str, ...] = field(default=(VM,))

    def repair(self, daemon: Daemon, facts: Facts) -> str:
        return (self.rerun or self.start)(daemon, facts)


# Requests ---------------------------------------------------------------------


def started(daemon: Daemon, method: str, path: str, body: dict[str, Any] | None = None) -> str:
    answer: dict[str, Any] = daemon.call(method, path, json=body if body is not None else {})
    return str(answer["job"])


def finish(daemon: Daemon, job_id: str) -> dict[str, Any]:
    """Drive a setup job to its end (answering awaits); it must succeed."""
    from .driver import drive

    done = drive(daemon, job_id, deadline=180.0)
    assert done["state"] == "succeeded", done
    return done


def protect(daemon: Daemon, vm: str = VM) -> dict[str, Any]:
    body = {"vm": vm, "to": "cloud", "interval": "1h", "verify_points": True}
    return finish(daemon, started(daemon, "POST", "/items", body))


def replicate(daemon: Daemon, vm: str = VM) -> dict[str, Any]:
    point: dict[str, Any] = daemon.call(
        "POST", f"/items/{vm}/replicate", json={"app_consistent": True}
    )["point"]
    assert point["workload_seq"] is not None, point
    return point


def failover(daemon: Daemon, vm: str = VM, **body: Any) -> str:
    return started(daemon, "POST", f"/items/{vm}/failover", body)


# Facts read from the VMs -----------------------------------------------------------


def acknowledged(vault: Path, vm: str, site: str) -> int:
    """The last seq the guest of ``vm`` at ``site`` acknowledged (its state file)."""
    state = json.loads((vault / "sites" / site / "vms" / vm / "workload.json").read_text())
    return int(state["seq"])


def survivor(daemon: Daemon, vm: str, site: str, acked: int) -> int:
    """Check the journal of ``vm`` at ``site`` (it must run, be consistent);
    the number of acknowledged records up to ``acked`` it lacks."""
    shown = daemon.call("GET", f"/vms/{vm}", params={"site": site})
    assert shown["power"] == "running", shown
    report = daemon.call("GET", f"/vms/{vm}/check", params={"site": site})
    assert report["consistent"], report
    return max(0, acked - int(report["last_seq"]))


def running_intact(daemon: Daemon, vault: Path, vm: str, site: str) -> int:
    """A VM that went on running: its journal holds what its guest acknowledged."""
    return survivor(daemon, vm, site, acknowledged(vault, vm, site))


def item(daemon: Daemon, vm: str = VM) -> dict[str, Any]:
    found: dict[str, Any] = daemon.call("GET", f"/items/{vm}")
    return found


def settled(daemon: Daemon, vm: str, state: str, active: str) -> dict[str, Any]:
    found = item(daemon, vm)
    assert (found["state"], found["active_site"]) == (state, active), found
    assert found["busy_job"] is None, found
    return found


def steps(job: dict[str, Any]) -> dict[str, Any]:
    return {s["name"]: s["detail"] for s in job["steps"] if s["state"] == "succeeded"}


def equal_digests(detail: dict[str, Any]) -> None:
    disks = detail["disks"]
    assert disks, detail
    for name, disk in disks.items():
        assert disk["source_digest"] == disk["target_digest"], (name, disk)


def point_holds(daemon: Daemon, vm: str, point: str, acked: int) -> int:
    """Records up to ``acked`` missing from recovery point ``point`` (checked)."""
    report = daemon.call("GET", f"/vms/{vm}/check", params={"point": point})
    assert report["consistent"], report
    return max(0, acked - int(report["last_seq"]))


def no_inconsistent_vm(daemon: Daemon) -> None:
    marked = [v for v in daemon.call("GET", "/vms") if v["power"] == "inconsistent"]
    assert not marked, marked


# Scenarios --------------------------------------------------------------------------


def _protect_setup(daemon: Daemon, facts: Facts) -> None:
    """Nothing: the lab's VMs run, unprotected."""


def _protect_start(daemon: Daemon, facts: Facts) -> str:
    body = {"vm": VM, "to": "cloud", "interval": "1h", "verify_points": True}
    return started(daemon, "POST", "/items", body)


def _protect_verify(daemon: Daemon, vault: Path, facts: Facts, job_id: str) -> int:
    settled(daemon, VM, "protected", "onprem")
    sync = steps(daemon.call("GET", f"/jobs/{job_id}"))["initial-sync"]
    equal_digests(sync)
    point_holds(daemon, VM, sync["point"]["id"], 0)
    no_inconsistent_vm(daemon)
    return running_intact(daemon, vault, VM, "onprem")


def _drill_setup(daemon: Daemon, facts: Facts) -> None:
    protect(daemon)
    facts["point"] = replicate(daemon)


def _drill_start(daemon: Daemon, facts: Facts) -> str:
    return failover(daemon, type="test", point=facts["point"]["id"])


def _drill_verify(daemon: Daemon, vault: Path, facts: Facts, job_id: str) -> int:
    found = settled(daemon, VM, "protected", "onprem")
    assert found["drill"] is not None and found["drill"]["vm"] == f"{VM}-test", found
    lost = survivor(daemon, f"{VM}-test", "cloud", facts["point"]["workload_seq"])
    no_inconsistent_vm(daemon)
    return lost + running_intact(daemon, vault, VM, "onprem")


def _cleanup_setup(daemon: Daemon, facts: Facts) -> None:
    _drill_setup(daemon, facts)
    finish(daemon, _drill_start(daemon, facts))


def _cleanup_start(daemon: Daemon, facts: Facts) -> str:
    return started(daemon, "POST", f"/items/{VM}/cleanup-test")


def _cleanup_verify(daemon: Daemon, vault: Path, facts: Facts, job_id: str) -> int:
    found = settled(daemon, VM, "protected", "onprem")
    assert found["drill"] is None, found
    names = {v["name"] for v in daemon.call("GET", "/vms", params={"site": "cloud"})}
    assert f"{VM}-test" not in names, names
    return running_intact(daemon, vault, VM, "onprem")


def _planned_setup(daemon: Daemon, facts: Facts) -> None:
    protect(daemon)


def _planned_start(daemon: Daemon, facts: Facts) -> str:
    return failover(daemon, type="planned")


def _planned_verify(daemon: Daemon, vault: Path, facts: Facts, job_id: str) -> int:
    settled(daemon, VM, "failed-over", "cloud")
    job = daemon.call("GET", f"/jobs/{job_id}")
    equal_digests(steps(job)["final-replication"])
    acked = acknowledged(vault, VM, "onprem")  # stopped: its last word
    assert daemon.call("GET", f"/vms/{VM}", params={"site": "onprem"})["power"] == "stopped"
    lost = point_holds(daemon, VM, job["result"]["zero_data_loss"]["point"], acked)
    no_inconsistent_vm(daemon)
    return lost + survivor(daemon, VM, "cloud", acked)


def _unplanned_setup(daemon: Daemon, facts: Facts) -> None:
    protect(daemon)
    facts["point"] = replicate(daemon)


def _unplanned_start(daemon: Daemon, facts: Facts) -> str:
    return failover(daemon, type="unplanned", point=facts["point"]["id"])


def _unplanned_verify(daemon: Daemon, vault: Path, facts: Facts, job_id: str) -> int:
    found = settled(daemon, VM, "failed-over", "cloud")
    assert found["failover"]["point"] == facts["point"]["id"], found
    assert daemon.call("GET", f"/vms/{VM}", params={"site": "onprem"})["power"] == "stopped"
    no_inconsistent_vm(daemon)
    return survivor(daemon, VM, "cloud", facts["point"]["workload_seq"])


def _change_point_setup(daemon: Daemon, facts: Facts) -> None:
    protect(daemon)
    facts["point"] = replicate(daemon)  # the older point, chosen by the re-run
    time.sleep(0.3)
    latest = replicate(daemon)
    finish(daemon, failover(daemon, type="unplanned", point=latest["id"]))


def _commit_setup(daemon: Daemon, facts: Facts) -> None:
    protect(daemon)
    finish(daemon, failover(daemon, type="unplanned", point="latest"))


def _commit_start(daemon: Daemon, facts: Facts) -> str:
    return started(daemon, "POST", f"/items/{VM}/commit")


def _commit_verify(daemon: Daemon, vault: Path, facts: Facts, job_id: str) -> int:
    settled(daemon, VM, "committed", "cloud")
    assert daemon.call("GET", f"/vms/{VM}", params={"site": "onprem"})["power"] == "stopped"
    return running_intact(daemon, vault, VM, "cloud")


def _failback_setup(daemon: Daemon, facts: Facts) -> None:
    _commit_setup(daemon, facts)
    finish(daemon, _commit_start(daemon, facts))
    time.sleep(0.5)  # the guest writes at the cloud site


def _failback_start(sync: str) -> Callable[[Daemon, Facts], str]:
    def start(daemon: Daemon, facts: Facts) -> str:
        return failover(daemon, type="planned", sync=sync)

    return start


def _failback_verify(daemon: Daemon, vault: Path, facts: Facts, job_id: str) -> int:
    found = settled(daemon, VM, "failed-over", "onprem")
    assert found["direction"] == "onprem -> cloud", found
    job = daemon.call("GET", f"/jobs/{job_id}")
    integrity = job["result"]["integrity"]
    assert integrity["equal"] is True, integrity
    assert integrity["source_digest"] == integrity["target_digest"], integrity
    assert daemon.call("GET", f"/vms/{VM}", params={"site": "cloud"})["power"] == "stopped"
    no_inconsistent_vm(daemon)
    return survivor(daemon, VM, "onprem", acknowledged(vault, VM, "cloud"))


def _reprotect_setup(daemon: Daemon, facts: Facts) -> None:
    protect(daemon)
    finish(daemon, failover(daemon, type="planned"))
    finish(daemon, _commit_start(daemon, facts))


def _reprotect_start(daemon: Daemon, facts: Facts) -> str:
    return started(daemon, "POST", f"/items/{VM}/reprotect")


def _reprotect_verify(daemon: Daemon, vault: Path, facts: Facts, job_id: str) -> int:
    found = settled(daemon, VM, "protected", "cloud")
    assert found["direction"] == "cloud -> onprem", found
    sync = steps(daemon.call("GET", f"/jobs/{job_id}"))["initial-sync"]
    equal_digests(sync)
    point_holds(daemon, VM, sync["point"]["id"], 0)
    point = replicate(daemon)  # replication goes on from the new base
    lost = point_holds(daemon, VM, point["id"], point["workload_seq"])
    no_inconsistent_vm(daemon)
    return lost + running_intact(daemon, vault, VM, "cloud")


def _plan_setup(daemon: Daemon, facts: Facts) -> None:
    for vm in PLAN_VMS:
        protect(daemon, vm)
    daemon.call("POST", "/plans", json={"name": "tiers"})
    for group, vm in enumerate(PLAN_VMS, start=1):
        daemon.call("POST", "/plans/tiers/vms", json={"group": group, "vms": [vm]})
    action = {"group": 2, "name": "approve", "kind": "manual", "instructions": "go on?"}
    daemon.call("POST", "/plans/tiers/actions", json=action)


def _plan_start(daemon: Daemon, facts: Facts) -> str:
    return started(daemon, "POST", "/plans/tiers/failover", {"type": "planned"})


def _plan_verify(daemon: Daemon, vault: Path, facts: Facts, job_id: str) -> int:
    children = daemon.call("GET", f"/jobs/{job_id}")["result"]["children"]
    lost = 0
    for vm in PLAN_VMS:
        settled(daemon, vm, "failed-over", "cloud")
        child = daemon.call("GET", f"/jobs/{children[vm]}")
        assert child["state"] == "succeeded", child
        equal_digests(steps(child)["final-replication"])
        acked = acknowledged(vault, vm, "onprem")
        lost += point_holds(daemon, vm, child["result"]["zero_data_loss"]["point"], acked)
        lost += survivor(daemon, vm, "cloud", acked)
    no_inconsistent_vm(daemon)
    return lost


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("protect", "protect", _protect_setup, _protect_start, _protect_verify),
    Scenario("test-failover", "test failover", _drill_setup, _drill_start, _drill_verify),
    Scenario("cleanup-test", "cleanup (test)", _cleanup_setup, _cleanup_start, _cleanup_verify),
    Scenario("planned", "planned failover", _planned_setup, _planned_start, _planned_verify),
    Scenario("unplanned", "unplanned failover", _unplanned_setup, _unplanned_start,
             _unplanned_verify),
    Scenario("change-point", "unplanned, change point", _change_point_setup, _unplanned_start,
             _unplanned_verify),
    Scenario("commit", "commit", _commit_setup, _commit_start, _commit_verify),
    Scenario("failback-delta", "delta failback", _failback_setup, _failback_start("delta"),
             _failback_verify),
    Scenario("failback-full", "full failback", _failback_setup, _failback_start("full"),
             _failback_verify),
    Scenario("reprotect", "reprotect", _reprotect_setup, _reprotect_start, _reprotect_verify),
    Scenario("plan-manual", "plan failover (manual action)", _plan_setup, _plan_start,
             _plan_verify, vms=PLAN_VMS),
)  # fmt: skip

BY_NAME = {s.name: s for s in SCENARIOS}
