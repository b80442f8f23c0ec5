"""A daemon SIGKILLed in the middle of a failback's data movement loses no work.

- killed mid-phase-1 (the source running): phase 1 resumes from its watermark
  and phase 2 still reads only phase 1's bitmap (what the guest wrote after
  phase 1), not every block by checksum;
- killed while a stopped VM's disks are served by a transient
  qemu-storage-daemon (a full download, phase 2): that daemon outlives the
  engine with its point-in-time view, and the restarted job resumes from the
  persisted watermark.

Every test proves the bytes: the job's digests and the written ranges read back
from the VM running at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import StorageDaemon
from siterecovery.providers.local.provider import LocalProvider

from ..conftest import Daemon
from .support import failover, item, job, protect, site, step

MiB = 1 << 20
FIRST = 256 * MiB
"""Where the change made before the failback lies on the 1 GiB disk."""
LATER = 640 * MiB
"""Where the guest writes after phase 1."""


def _nbd(vault: Path, vm: str, where: str) -> Path:
    return LocalProvider().run_dir(site(vault, where), f"vm-{vm}") / "nbd.sock"


def _write(vault: Path, vm: str, where: str, offset: int, data: bytes) -> None:
    """Write into the running VM's disk as its guest would."""
    with NbdDevice.connect(_nbd(vault, vm, where), "d0", writable=True) as disk:
        disk.write(offset, memoryview(data))
        disk.flush()


def _digest(vault: Path, vm: str, where: str, offset: int, size: int) -> str:
    """sha256 of a range as the running VM at ``where`` reads it."""
    buf = bytearray(size)
    with NbdDevice.connect(_nbd(vault, vm, where), "d0") as disk:
        disk.readinto(offset, memoryview(buf))
    return hashlib.sha256(buf).hexdigest()


def _failed_over_and_changed(daemon: Daemon, vault: Path, vm: str, data: bytes) -> None:
    """A VM without guest workload, protected, failed over and committed; then
    ``data`` written at FIRST by the VM now running at the cloud site."""
    daemon.call(
        "POST", "/vms", json={"name": vm, "host": "hv01", "disks": ["1G"], "workload": False}
    )
    protect(daemon, vm)
    job(daemon, failover(daemon, vm, type="unplanned"))
    job(daemon, daemon.call("POST", f"/items/{vm}/commit", json={}))
    _write(vault, vm, "cloud", FIRST, data)


def _running_step(daemon: Daemon, job_id: str, name: str, done: int) -> None:
    """Wait until step ``name`` runs and has moved ``done`` bytes of its own
    (a finished step leaves bytes_done == bytes_total)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = daemon.call("GET", f"/jobs/{job_id}")
        running = {s["name"] for s in found["steps"] if s["state"] == "running"}
        if name in running and done <= found["bytes_done"] < found["bytes_total"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"step {name} of {job_id} never reached {done} bytes")


def _transient_qsd(vault: Path, vm: str, where: str) -> StorageDaemon | None:
    """The transient daemon serving a stopped VM's disks, if one runs."""
    return StorageDaemon.attach(LocalProvider().run_dir(site(vault, where), f"access-{vm}"))


def _figures(label: str, done: dict[str, Any]) -> None:
    """Print the phase-2 figures of a finished failback (shown with ``pytest -s``)."""
    d0 = step(done, "phase2-sync")["disks"]["d0"]
    figures = {k: d0[k] for k in ("mode", "bytes_read", "bytes_hashed", "resumed")}
    print(label, json.dumps({**figures, **done["result"]["phase2"]}))


@pytest.mark.parametrize("crash", [True, False], ids=["killed-mid-phase1", "uninterrupted"])
def test_phase2_after_a_resumed_phase1_reads_only_what_changed_after_it(
    daemon: Daemon, vault: Path, crash: bool
) -> None:
    vm = "p1k01"
    first = os.urandom(64 * MiB)
    _failed_over_and_changed(daemon, vault, vm, first)
    daemon.call("PATCH", f"/items/{vm}", json={"max_rate": "8M"})
    started = failover(daemon, vm, type="planned", sync="delta")
    if crash:
        _running_step(daemon, started["job"], "phase1-sync", 20 * MiB)
        daemon.kill()
        daemon.start()
    waiting = job(daemon, started, "awaiting-completion")
    phase1 = step(waiting, "phase1-sync")["disks"]["d0"]
    assert phase1["resumed"] is crash
    if crash:
        assert phase1["resumed_from"] >= FIRST + 16 * MiB
        assert phase1["bytes_read"] <= 48 * MiB

    later = os.urandom(2 * MiB)
    _write(vault, vm, "cloud", LATER, later)
    daemon.call("POST", f"/jobs/{started['job']}/complete")
    done = job(daemon, started)
    _figures("crash" if crash else "no-crash", done)

    phase2 = step(done, "phase2-sync")["disks"]["d0"]
    assert phase2["mode"] == "tracked"  # phase 1's bitmap, not checksums
    assert phase2["bytes_hashed"] == 0
    assert 2 * MiB <= phase2["bytes_read"] <= 2 * MiB + 64 * 1024
    assert done["result"]["phase2"]["bytes"] == phase2["bytes_written"]
    assert done["result"]["integrity"]["equal"] is True
    assert item(daemon, vm)["state"] == "failed-over"
    assert _digest(vault, vm, "onprem", FIRST, len(first)) == hashlib.sha256(first).hexdigest()
    assert _digest(vault, vm, "onprem", LATER, len(later)) == hashlib.sha256(later).hexdigest()


@pytest.mark.parametrize(
    "leftover",
    ["kept", pytest.param("stopped-cleanly", marks=pytest.mark.slow)],
)
def test_full_failback_killed_mid_download_resumes_from_the_watermark(
    daemon: Daemon, vault: Path, leftover: str
) -> None:
    """``kept``: the transient daemons outlive the engine, the view is found
    again. ``stopped-cleanly``: they are stopped (SIGTERM) while the engine is
    down, so the view is lost; the checkpoint its freeze started recorded
    nothing, so a new view shows the same data and the watermark still holds."""
    vm = "fdk01"
    data = os.urandom(64 * MiB)
    _failed_over_and_changed(daemon, vault, vm, data)
    daemon.call("PATCH", f"/items/{vm}", json={"max_rate": "8M"})
    started = failover(daemon, vm, type="planned", sync="full")
    _running_step(daemon, started["job"], "full-download", 20 * MiB)
    daemon.kill()
    # Both VMs are stopped: transient daemons serve their disks and outlive the engine.
    for where in ("cloud", "onprem"):
        transient = _transient_qsd(vault, vm, where)
        assert transient is not None
        if leftover == "stopped-cleanly":
            transient.stop()
    daemon.start()
    daemon.call("PATCH", f"/items/{vm}", json={"max_rate": "0"})
    done = job(daemon, started)

    download = step(done, "full-download")["disks"]["d0"]
    assert download["resumed"] is True
    assert download["resumed_from"] >= FIRST + 16 * MiB
    assert download["bytes_read"] <= 48 * MiB  # only what was left after the watermark
    assert done["result"]["integrity"]["equal"] is True
    assert item(daemon, vm)["state"] == "failed-over"
    # The job ended: no transient daemon is left on either side.
    assert _transient_qsd(vault, vm, "cloud") is None
    assert _transient_qsd(vault, vm, "onprem") is None
    assert _digest(vault, vm, "onprem", FIRST, len(data)) == hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_delta_failback_killed_mid_phase2_resumes_from_the_watermark(
    daemon: Daemon, vault: Path
) -> None:
    vm = "p2k01"
    first = os.urandom(8 * MiB)
    _failed_over_and_changed(daemon, vault, vm, first)
    started = failover(daemon, vm, type="planned", sync="delta")
    job(daemon, started, "awaiting-completion")
    later = os.urandom(64 * MiB)
    _write(vault, vm, "cloud", LATER, later)
    daemon.call("PATCH", f"/items/{vm}", json={"max_rate": "8M"})
    daemon.call("POST", f"/jobs/{started['job']}/complete")
    _running_step(daemon, started["job"], "phase2-sync", 20 * MiB)
    daemon.kill()
    assert _transient_qsd(vault, vm, "cloud") is not None  # the stopped source's
    daemon.start()
    daemon.call("PATCH", f"/items/{vm}", json={"max_rate": "0"})
    done = job(daemon, started)
    _figures("killed-mid-phase2", done)

    phase2 = step(done, "phase2-sync")["disks"]["d0"]
    assert phase2["resumed"] is True
    assert phase2["mode"] == "tracked"
    assert phase2["resumed_from"] >= LATER + 16 * MiB
    assert phase2["bytes_read"] <= 48 * MiB
    assert done["result"]["integrity"]["equal"] is True
    assert _transient_qsd(vault, vm, "cloud") is None
    assert _digest(vault, vm, "onprem", FIRST, len(first)) == hashlib.sha256(first).hexdigest()
    assert _digest(vault, vm, "onprem", LATER, len(later)) == hashlib.sha256(later).hexdigest()
