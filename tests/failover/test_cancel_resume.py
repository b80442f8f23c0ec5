"""Crash safety of a failback: cancel → inconsistent → refused start → re-run
resumes (not from zero); a daemon SIGKILL mid-sync resumes on restart."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from siterecovery.disk.nbd import NbdDevice
from siterecovery.providers.local.provider import LocalProvider

from ..conftest import Daemon
from .support import failover, item, job, protect, site, step

MiB = 1 << 20


def _nbd(vault: Path, vm: str, where: str) -> Path:
    return LocalProvider().run_dir(site(vault, where), f"vm-{vm}") / "nbd.sock"


def _big_change_at_cloud(daemon: Daemon, vault: Path, vm: str, size: int) -> str:
    """A VM without guest workload: protect, fail over, commit, then write ``size``
    random bytes at the cloud site. Returns the sha256 of what was written."""
    daemon.call(
        "POST", "/vms", json={"name": vm, "host": "hv01", "disks": ["1G"], "workload": False}
    )
    protect(daemon, vm)
    job(daemon, failover(daemon, vm, type="unplanned"))
    job(daemon, daemon.call("POST", f"/items/{vm}/commit", json={}))
    data = os.urandom(size)
    with NbdDevice.connect(_nbd(vault, vm, "cloud"), "d0", writable=True) as disk:
        disk.write(256 * MiB, memoryview(data))
        disk.flush()
    return hashlib.sha256(data).hexdigest()


def _home_digest(vault: Path, vm: str, size: int) -> str:
    """sha256 of the changed range as the running on-premises VM reads it."""
    buf = bytearray(size)
    with NbdDevice.connect(_nbd(vault, vm, "onprem"), "d0") as disk:
        disk.readinto(256 * MiB, memoryview(buf))
    return hashlib.sha256(buf).hexdigest()


def _running_until(daemon: Daemon, job_id: str, done: int) -> None:
    while daemon.call("GET", f"/jobs/{job_id}")["bytes_done"] < done:
        time.sleep(0.1)


def test_cancel_marks_inconsistent_and_rerun_resumes(daemon: Daemon, vault: Path) -> None:
    written = _big_change_at_cloud(daemon, vault, "big01", 64 * MiB)
    daemon.call("PATCH", "/items/big01", json={"max_rate": "8M"})
    first = failover(daemon, "big01", type="planned", sync="delta")
    _running_until(daemon, first["job"], 20 * MiB)
    daemon.call("POST", f"/jobs/{first['job']}/cancel")
    cancelled = job(daemon, first, "cancelled")
    assert cancelled["error"]["code"] in ("JOB_CANCELLED", "SYNC_CANCELLED")
    assert item(daemon, "big01")["state"] == "inconsistent"
    status, error = daemon.error("POST", "/vms/big01/start", params={"site": "onprem"})
    assert (status, error["code"]) == (409, "VM_INCONSISTENT")
    assert "re-run the failover" in error["message"]

    daemon.call("PATCH", "/items/big01", json={"max_rate": "0"})
    again = job(
        daemon, failover(daemon, "big01", type="planned", sync="delta"), "awaiting-completion"
    )
    assert again["state"] == "awaiting-completion", again
    sync = step(again, "phase1-sync")["disks"]["d0"]
    assert sync["resumed_from"] >= 16 * MiB  # not from zero
    assert sync["bytes_read"] < 64 * MiB
    daemon.call("POST", f"/jobs/{again['id']}/complete")
    done = job(daemon, {"job": again["id"]})
    assert done["result"]["integrity"]["equal"] is True
    assert daemon.call("GET", "/vms/big01", params={"site": "onprem"})["power"] == "running"
    assert _home_digest(vault, "big01", 64 * MiB) == written


def test_daemon_sigkill_mid_failback_resumes_on_restart(daemon: Daemon, vault: Path) -> None:
    written = _big_change_at_cloud(daemon, vault, "big02", 64 * MiB)
    daemon.call("PATCH", "/items/big02", json={"max_rate": "8M"})
    started = failover(daemon, "big02", type="planned", sync="delta")
    _running_until(daemon, started["job"], 20 * MiB)
    daemon.kill()
    daemon.start()
    daemon.call("PATCH", "/items/big02", json={"max_rate": "0"})
    waiting = job(daemon, started, "awaiting-completion")
    sync = step(waiting, "phase1-sync")["disks"]["d0"]
    assert sync["resumed_from"] >= 16 * MiB
    daemon.call("POST", f"/jobs/{started['job']}/complete")
    done = job(daemon, started)
    assert done["result"]["integrity"]["equal"] is True
    assert item(daemon, "big02")["state"] == "failed-over"
    assert _home_digest(vault, "big02", 64 * MiB) == written
