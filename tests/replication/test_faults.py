"""Fault matrix of the replication pass: a VM's qemu-storage-daemon killed in
the middle of a pass, and the recovery site's filesystem full (a real tmpfs of
a few MiB the test mounts, then grows).

Each fault must fail the pass cleanly (no point sealed, the earlier points'
files unchanged by digest) and the next pass must seal a consistent point."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from siterecovery.disk.nbd import NbdDevice
from siterecovery.providers.local import journal
from siterecovery.providers.local.journal import JournalWriter
from siterecovery.providers.local.provider import LocalProvider

from ..conftest import Daemon, _stop_vms
from .test_protect_e2e import _site, _vm_run

MiB = 1 << 20


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _replica_files(vault: Path, vm: str) -> dict[str, str]:
    """Every file of the VM's replica chains at the cloud site, by digest."""
    root = vault / "sites" / "cloud" / "replicas" / vm
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _sealed_digests(vault: Path, vm: str, points: list[dict[str, Any]]) -> dict[str, str]:
    root = vault / "sites" / "cloud" / "replicas" / vm / "d0"
    return {p["id"]: _sha256(root / p["files"]["d0"]) for p in points}


def _background(daemon: Daemon, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """Start a call in a thread (its own client); the dict gets ``response``."""
    assert daemon.client is not None
    result: dict[str, Any] = {}
    client = httpx.Client(
        base_url=str(daemon.client.base_url), headers=daemon.client.headers, timeout=300
    )

    def run() -> None:
        with client:
            result["response"] = client.request(method, path, **kwargs)

    result["thread"] = threading.Thread(target=run, daemon=True)
    result["thread"].start()
    return result


def _wait_for(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# A VM's qemu-storage-daemon killed during a pass ----------------------------


def test_qsd_killed_mid_pass_next_pass_falls_back_to_checksums(daemon: Daemon, vault: Path) -> None:
    body = {"vm": "web01", "to": "cloud", "interval": "1h", "verify_points": True}
    job = daemon.wait_job(daemon.call("POST", "/items", json=body)["job"])
    assert job["state"] == "succeeded", job
    points = daemon.call("GET", "/items/web01/points")
    before = _sealed_digests(vault, "web01", points)

    # A slow pass (256 KiB/s), killed once its writer runs.
    daemon.call("PATCH", "/items/web01", json={"max_rate": "256K"})
    time.sleep(2.0)  # the guest writes a few MiB
    call = _background(daemon, "POST", "/items/web01/replicate", json={})
    writer = _vm_writer_pid(vault, "web01")
    _wait_for(lambda: writer.exists(), "the pass's writer")
    time.sleep(0.5)
    os.kill(int((_vm_run(vault, "web01") / "qsd.pid").read_text()), signal.SIGKILL)
    call["thread"].join(120)
    failed = call["response"]
    assert failed.status_code == 502, failed.text
    error = failed.json()["error"]
    assert error["code"] == "DISK_ERROR" and "exited during the pass" in error["message"], error

    # No point sealed, the earlier ones unchanged.
    assert daemon.call("GET", "/items/web01/points") == points
    assert _sealed_digests(vault, "web01", points) == before

    _wait_for(lambda: daemon.call("GET", "/vms/web01")["power"] == "stopped", "VM stopped")
    daemon.call("PATCH", "/items/web01", json={"max_rate": "0"})
    daemon.call("POST", "/vms/web01/start")
    time.sleep(1.0)
    report = daemon.call("POST", "/items/web01/replicate", json={})
    disk = report["disks"]["d0"]
    assert disk["tracking"] in ("inconsistent-bitmap", "no-bitmap"), disk
    assert disk["mode"] == "checksum" and disk["source_digest"] == disk["target_digest"]
    check = daemon.call("GET", "/vms/web01/check", params={"point": report["point"]["id"]})
    assert check["consistent"] and check["last_seq"] > 0, check

    after = daemon.call("POST", "/items/web01/replicate", json={})["disks"]["d0"]
    assert (after["tracking"], after["mode"]) == ("bitmap", "tracked")
    assert _sealed_digests(vault, "web01", points) == before


def _vm_writer_pid(vault: Path, vm: str) -> Path:
    return LocalProvider().run_dir(_site(vault, "cloud"), f"writer-{vm}-d0") / "qsd.pid"


# The recovery site's filesystem full during a pass --------------------------


@pytest.fixture
def small_cloud(vault: Path) -> Iterator[tuple[Daemon, Path]]:
    """The lab with the cloud site's directory on a 64 MiB tmpfs (grown by tests)."""
    mount = vault / "sites" / "cloud"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "srtest", str(mount)], check=True)
    running = Daemon(vault)
    try:
        running.start(lab=True)
        yield running, mount
    finally:
        try:
            if running.process is not None and running.process.poll() is None:
                running.call("POST", "/lab/down")
        finally:
            running.stop()
            _stop_vms(vault)
            subprocess.run(["umount", "-l", str(mount)], check=False)


def _resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


def _used(mount: Path) -> int:
    stat = os.statvfs(mount)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def _append(vault: Path, vm: str, records: int, where: str = "onprem") -> int:
    """Write ``records`` journal records to the VM's disk; the last seq."""
    run = LocalProvider().run_dir(_site(vault, where), f"vm-{vm}")
    with NbdDevice.connect(run / "nbd.sock", "d0", writable=True) as disk:
        if journal.read_superblock(disk) is None:
            journal.format_disks([disk], seed=11)
        writer = JournalWriter.open([disk])
        for _ in range(records):
            writer.append()
        return writer.last_seq


def test_disk_full_at_the_recovery_site_fails_the_pass_cleanly_then_recovers(
    small_cloud: tuple[Daemon, Path], vault: Path
) -> None:
    daemon, mount = small_cloud
    vm = {"name": "fill01", "host": "hv01", "disks": ["256M"], "workload": False}
    daemon.call("POST", "/vms", json=vm)
    first_seq = _append(vault, "fill01", 200)
    body = {"vm": "fill01", "to": "cloud", "interval": "1h"}
    job = daemon.wait_job(daemon.call("POST", "/items", json=body)["job"])
    assert job["state"] == "succeeded", job
    points = daemon.call("GET", "/items/fill01/points")
    files = _replica_files(vault, "fill01")

    # Leave 4 MiB free, then change far more than that.
    _resize(mount, _used(mount) + 4 * MiB)
    last_seq = _append(vault, "fill01", 600)
    status, error = daemon.error("POST", "/items/fill01/replicate", json={})
    assert (status, error["code"]) == (502, "DISK_FULL"), error
    replicas = str(vault / "sites" / "cloud" / "replicas" / "fill01" / "d0")
    assert error["details"]["site"] == "cloud" and error["details"]["where"] == replicas
    assert "no space left on device" in error["message"] and "free space" in error["message"]

    # Nothing sealed, no partial left taking the space, earlier files unchanged.
    assert daemon.call("GET", "/items/fill01/points") == points
    assert _replica_files(vault, "fill01") == files
    assert error["details"]["free"] >= 3 * MiB

    # Space returns: the next pass seals a consistent point holding every record.
    _resize(mount, 256 * MiB)
    report = daemon.call("POST", "/items/fill01/replicate", json={})
    assert report["disks"]["d0"]["tracking"] == "bitmap"
    point = report["point"]["id"]
    check = daemon.call("GET", "/vms/fill01/check", params={"point": point})
    assert check["consistent"] and check["last_seq"] == last_seq, check
    assert {k: v for k, v in _replica_files(vault, "fill01").items() if k in files} == files
    old = daemon.call("GET", "/vms/fill01/check", params={"point": points[0]["id"]})
    assert old["consistent"] and old["last_seq"] == first_seq, old


# The failback's target site full -------------------------------------------


@pytest.fixture
def small_vm_dir(daemon: Daemon, vault: Path) -> Iterator[Path]:
    """fill01's directory at onprem on a 64 MiB tmpfs (mounted before the VM exists)."""
    mount = vault / "sites" / "onprem" / "vms" / "fill01"
    mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "srtest", str(mount)], check=True)
    try:
        yield mount
    finally:
        try:
            daemon.call("POST", "/lab/down")
        finally:
            _stop_vms(vault)
            subprocess.run(["umount", "-l", str(mount)], check=False)


def _job(daemon: Daemon, answer: dict[str, Any]) -> dict[str, Any]:
    return daemon.wait_job(answer["job"], timeout=300)


def test_disk_full_during_a_failback_fails_it_cleanly_then_it_succeeds(
    daemon: Daemon, vault: Path, small_vm_dir: Path
) -> None:
    vm = {"name": "fill01", "host": "hv01", "disks": ["256M"], "workload": False}
    daemon.call("POST", "/vms", json=vm)
    _append(vault, "fill01", 200)
    body = {"vm": "fill01", "to": "cloud", "interval": "1h"}
    assert _job(daemon, daemon.call("POST", "/items", json=body))["state"] == "succeeded"
    fo = daemon.call("POST", "/items/fill01/failover", json={"type": "unplanned"})
    assert _job(daemon, fo)["state"] == "succeeded"
    assert _job(daemon, daemon.call("POST", "/items/fill01/commit", json={}))["state"] == (
        "succeeded"
    )
    last_seq = _append(vault, "fill01", 600, where="cloud")  # written after the failover
    points = daemon.call("GET", "/items/fill01/points")
    files = _replica_files(vault, "fill01")

    _resize(small_vm_dir, _used(small_vm_dir) + 4 * MiB)
    failback = {"type": "planned", "sync": "full"}
    failed = _job(daemon, daemon.call("POST", "/items/fill01/failover", json=failback))
    assert failed["state"] == "failed", failed
    assert failed["error"]["code"] == "DISK_FULL", failed["error"]
    assert "no space left on device" in failed["error"]["message"]
    assert failed["error"]["details"]["site"] == "onprem", failed["error"]
    assert failed["error"]["details"]["free"] is not None
    assert daemon.call("GET", "/items/fill01")["state"] == "inconsistent"
    assert daemon.call("GET", "/items/fill01/points") == points
    assert _replica_files(vault, "fill01") == files

    _resize(small_vm_dir, 512 * MiB)
    done = _job(daemon, daemon.call("POST", "/items/fill01/failover", json=failback))
    assert done["state"] == "succeeded", done
    assert done["result"]["integrity"]["equal"] is True
    check = daemon.call("GET", "/vms/fill01/check", params={"site": "onprem"})
    assert check["consistent"] and check["last_seq"] == last_seq, check
    assert _replica_files(vault, "fill01") == files
