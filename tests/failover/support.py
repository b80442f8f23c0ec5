"""Helpers of the failover tests: jobs, VM checks, guest control, byte accounting."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from siterecovery.domain.model import Site, SiteRole
from siterecovery.providers.local import journal
from siterecovery.providers.local.guest import WorkloadControl
from siterecovery.providers.local.provider import LocalProvider

from ..conftest import Daemon


def site(vault: Path, name: str) -> Site:
    role = SiteRole.ON_PREMISES if name == "onprem" else SiteRole.CLOUD
    return Site(name=name, provider="local", path=str(vault / "sites" / name), role=role)


def guest(vault: Path, vm: str, where: str) -> WorkloadControl:
    run = LocalProvider().run_dir(site(vault, where), f"vm-{vm}")
    return WorkloadControl(run / "workload.sock")


def job(daemon: Daemon, answer: dict[str, Any], state: str = "succeeded") -> dict[str, Any]:
    """Wait for the job an answer started; assert it ends (or pauses) in ``state``."""
    job_id = answer["job"]
    ends = {"succeeded", "failed", "cancelled", state}
    while True:
        found: dict[str, Any] = daemon.call("GET", f"/jobs/{job_id}/wait", params={"timeout": 10})
        if found["state"] in ends:
            break
        time.sleep(0.1)  # e.g. still awaiting-completion just after `complete`
    assert found["state"] == state, found
    return found


def step(job: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in job["steps"] if s["name"] == name)
    return found["detail"]


def check(daemon: Daemon, vm: str, where: str) -> dict[str, Any]:
    report: dict[str, Any] = daemon.call("GET", f"/vms/{vm}/check", params={"site": where})
    assert report["consistent"], report
    return report


def item(daemon: Daemon, vm: str) -> dict[str, Any]:
    found: dict[str, Any] = daemon.call("GET", f"/items/{vm}")
    return found


def protect(daemon: Daemon, vm: str, **policy: Any) -> dict[str, Any]:
    body = {"vm": vm, "to": "cloud", "interval": "1h", **policy}
    return job(daemon, daemon.call("POST", "/items", json=body))


def failover(daemon: Daemon, vm: str, **body: Any) -> dict[str, Any]:
    answer: dict[str, Any] = daemon.call("POST", f"/items/{vm}/failover", json=body)
    return answer


def written_bytes(superblock: journal.Superblock, first: int, last: int) -> int:
    """What the guest wrote for records first..last: their data and journal slots."""
    records = (journal.plan_record(superblock, seq) for seq in range(first, last + 1))
    return sum(r.length + journal.SLOT_SIZE for r in records)
