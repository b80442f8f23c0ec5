"""Protection end to end on the lab: a real daemon, real VMs with their workload
writing, real qemu-storage-daemons. Data is checked with digests computed from
images that qemu-img exports, independently of the engine."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice
from siterecovery.disk.nbd import NbdDevice
from siterecovery.domain.model import Site, SiteRole
from siterecovery.providers.local import journal
from siterecovery.providers.local.guest import WorkloadControl
from siterecovery.providers.local.provider import LocalProvider

from ..conftest import Daemon

CLUSTER = 64 * 1024


def _site(vault: Path, name: str) -> Site:
    role = SiteRole.ON_PREMISES if name == "onprem" else SiteRole.CLOUD
    return Site(name=name, provider="local", path=str(vault / "sites" / name), role=role)


def _vm_run(vault: Path, vm: str) -> Path:
    return LocalProvider().run_dir(_site(vault, "onprem"), f"vm-{vm}")


def _export_raw(source: str, out: Path, fmt: str = "qcow2") -> Path:
    """Convert an image (file or NBD URL) to raw with qemu-img, independently of us."""
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", source, str(out)],
        check=True,
        capture_output=True,
    )
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _point_raw(vault: Path, vm: str, point: dict[str, Any], out: Path) -> Path:
    chain = vault / "sites" / point["site"] / "replicas" / vm / "d0"
    return _export_raw(str(chain / point["files"]["d0"]), out)


def _protect(daemon: Daemon, vm: str, **policy: Any) -> dict[str, Any]:
    body = {"vm": vm, "to": "cloud", "interval": "1h", **policy}
    job = daemon.wait_job(daemon.call("POST", "/items", json=body)["job"])
    assert job["state"] == "succeeded", job
    return job


def _dirty_clusters(superblock: journal.Superblock, first: int, last: int) -> set[int]:
    """Clusters the workload wrote for records first..last: data and journal slot."""
    clusters: set[int] = set()
    for seq in range(first, last + 1):
        record = journal.plan_record(superblock, seq)
        assert record.disk == 0
        clusters.update(range(record.offset // CLUSTER, (record.end - 1) // CLUSTER + 1))
        clusters.add(superblock.slot_offset(seq) // CLUSTER)
    return clusters


def test_points_equal_the_source_and_cycles_read_only_dirty_extents(
    daemon: Daemon, vault: Path, tmp_path: Path
) -> None:
    initial = _protect(daemon, "web01", verify_points=True)
    sync = initial["steps"][1]["detail"]["disks"]["d0"]
    assert sync["mode"] == "full" and sync["source_digest"] == sync["target_digest"]

    reports = []
    for _ in range(3):
        time.sleep(1.0)  # the workload keeps writing between cycles
        reports.append(daemon.call("POST", "/items/web01/replicate", json={"app_consistent": True}))
    points = daemon.call("GET", "/items/web01/points")
    assert [p["seq"] for p in points] == [1, 2, 3, 4]

    # Every point's image, exported by qemu-img, has the digest the engine took
    # of the frozen source at that point's instant, and its journal is intact.
    for point in points:
        raw = _point_raw(vault, "web01", point, tmp_path / f"{point['id']}.raw")
        with FileDevice.open(raw) as device:
            assert disk_digest(device) == point["source_digests"]["d0"]
            report = journal.check([device])
        assert report.consistent, report.errors
        if point["workload_seq"] is not None:
            assert report.last_seq == point["workload_seq"]
        raw.unlink()

    # Each cycle read exactly the clusters the guest wrote since the previous
    # point (recomputed from the workload's deterministic record plan).
    with NbdDevice.connect(_vm_run(vault, "web01") / "nbd.sock", "d0") as live:
        superblock = journal.read_superblock(live)
    assert superblock is not None
    for before, point, report in zip(points[1:-1], points[2:], reports[1:], strict=True):
        disk = report["disks"]["d0"]
        expected = _dirty_clusters(superblock, before["workload_seq"] + 1, point["workload_seq"])
        assert disk["mode"] == "tracked" and disk["tracking"] == "bitmap"
        assert disk["source_bytes_read"] == len(expected) * CLUSTER
        assert disk["bytes_written"] == disk["source_bytes_read"]
        assert disk["source_bytes_read"] < (1 << 30) // 20  # far below the 1 GiB disk


def test_quiesced_point_equals_the_live_source_byte_for_byte(
    daemon: Daemon, vault: Path, tmp_path: Path
) -> None:
    _protect(daemon, "db01")
    guest = WorkloadControl(_vm_run(vault, "db01") / "workload.sock")
    seq = guest.quiesce(timeout=120)
    try:
        daemon.call("POST", "/items/db01/replicate", json={"app_consistent": False})
        socket = _vm_run(vault, "db01") / "nbd.sock"
        source = _export_raw(f"nbd+unix:///d0?socket={socket}", tmp_path / "src.raw", "raw")
    finally:
        guest.thaw()
    point = daemon.call("GET", "/items/db01/points")[-1]
    image = _point_raw(vault, "db01", point, tmp_path / "point.raw")
    assert _sha256(image) == _sha256(source)
    check = daemon.call("GET", "/vms/db01/check", params={"point": point["id"]})
    assert check["consistent"] and check["last_seq"] == seq


def _fill(socket: Path, export: str, nbytes: int) -> set[int]:
    """Write ``nbytes`` of random data in scattered 1 MiB extents; their offsets."""
    offsets = set()
    with NbdDevice.connect(socket, export, writable=True) as device:
        block = memoryview(bytearray(os.urandom(1 << 20)))
        for index in range(nbytes >> 20):
            offset = ((index * 7) % (device.size >> 20)) << 20
            device.write(offset, block)
            offsets.add(offset)
        device.flush()
    return offsets


def test_daemon_sigkill_mid_initial_sync_resumes_from_checkpoint(
    daemon: Daemon, vault: Path
) -> None:
    daemon.call(
        "POST", "/vms", json={"name": "big01", "host": "hv01", "disks": ["256M"], "workload": False}
    )
    filled = _fill(_vm_run(vault, "big01") / "nbd.sock", "d0", 48 << 20)
    body = {"vm": "big01", "to": "cloud", "interval": "1h", "max_rate": "3M"}
    job_id = daemon.call("POST", "/items", json=body)["job"]
    while daemon.call("GET", f"/jobs/{job_id}")["bytes_done"] < 20 << 20:
        time.sleep(0.2)
    daemon.kill()
    daemon.start()
    job = daemon.wait_job(job_id)
    assert job["state"] == "succeeded", job
    sync = job["steps"][1]["detail"]["disks"]["d0"]
    # The restarted sync read only the data above its last persisted offset.
    below = sum(1 << 20 for offset in filled if offset < sync["resumed_from"])
    assert below >= 16 << 20
    assert sync["bytes_read"] == (48 << 20) - below
    assert sync["source_digest"] == sync["target_digest"]
    item = daemon.call("GET", "/items/big01")
    assert item["state"] == "protected" and item["points"] == 1


def _crash_and_restart(daemon: Daemon, vault: Path, vm: str) -> None:
    """SIGKILL the VM's qemu-storage-daemon (a host crash), then start the VM again."""
    pid = int((_vm_run(vault, vm) / "qsd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while daemon.call("GET", f"/vms/{vm}")["power"] != "stopped" and time.monotonic() < deadline:
        time.sleep(0.1)
    daemon.call("POST", f"/vms/{vm}/start")
    time.sleep(1.0)  # the workload writes again


def _clean_restart(daemon: Daemon, vm: str) -> None:
    daemon.call("POST", f"/vms/{vm}/stop")
    daemon.call("POST", f"/vms/{vm}/start")
    time.sleep(1.0)


def _pass(daemon: Daemon, vm: str) -> dict[str, Any]:
    disk: dict[str, Any] = daemon.call("POST", f"/items/{vm}/replicate", json={})["disks"]["d0"]
    assert disk["source_digest"] == disk["target_digest"]
    return disk


def test_vm_crash_makes_the_next_cycle_fall_back_to_checksums(daemon: Daemon, vault: Path) -> None:
    _protect(daemon, "web01", verify_points=True)
    # A clean stop writes the change-tracking bitmap into the qcow2 file, and
    # tracking survives it: the next cycle still reads only dirty extents.
    _clean_restart(daemon, "web01")
    clean = _pass(daemon, "web01")
    assert (clean["tracking"], clean["mode"]) == ("bitmap", "tracked")

    # Crash after that cycle: its new bitmap never reached the file.
    _crash_and_restart(daemon, vault, "web01")
    lost = _pass(daemon, "web01")
    assert (lost["tracking"], lost["mode"]) == ("no-bitmap", "checksum")
    assert lost["bytes_written"] < 64 << 20  # only the differing blocks moved

    # Crash with a bitmap in the file: qemu reports it inconsistent; never trusted.
    _clean_restart(daemon, "web01")
    _crash_and_restart(daemon, vault, "web01")
    bad = _pass(daemon, "web01")
    assert (bad["tracking"], bad["mode"]) == ("inconsistent-bitmap", "checksum")

    after = _pass(daemon, "web01")
    assert (after["tracking"], after["mode"]) == ("bitmap", "tracked")
    for point in daemon.call("GET", "/items/web01/points")[-4:]:
        check = daemon.call("GET", "/vms/web01/check", params={"point": point["id"]})
        assert check["consistent"], check


def test_scheduler_runs_cycles_and_reports_health(daemon: Daemon) -> None:
    _protect(daemon, "db01", interval="1s", app_consistent_every=2)
    deadline = time.monotonic() + 60
    while daemon.call("GET", "/items/db01")["cycles"] < 4 and time.monotonic() < deadline:
        time.sleep(0.5)
    item = daemon.call("GET", "/items/db01")
    assert item["points"] >= 5 and item["cycles"] >= 4
    assert item["health"] in ("healthy", "warning") and item["last_error"] is None
    assert item["rpo_seconds"] is not None
    kinds = {p["type"] for p in daemon.call("GET", "/items/db01/points")}
    assert kinds == {"crash-consistent", "app-consistent"}
    assert json.loads(json.dumps(item))["state"] == "protected"


def test_two_disk_vm_points_are_consistent_across_disks(
    daemon: Daemon, vault: Path, tmp_path: Path
) -> None:
    """The workload writes data on both disks and its journal on d0: a point whose
    disks were frozen at different instants would fail the check."""
    body = {"name": "app01", "host": "hv01", "disks": ["256M", "256M"]}
    daemon.call("POST", "/vms", json=body)
    time.sleep(1.0)
    _protect(daemon, "app01", verify_points=True)
    for _ in range(4):
        time.sleep(0.5)
        report = daemon.call("POST", "/items/app01/replicate", json={"app_consistent": False})
        assert set(report["disks"]) == {"d0", "d1"}
        assert all(d["mode"] == "tracked" for d in report["disks"].values())
    for point in daemon.call("GET", "/items/app01/points"):
        assert set(point["files"]) == {"d0", "d1"}
        check = daemon.call("GET", "/vms/app01/check", params={"point": point["id"]})
        assert check["consistent"], check
        assert check["last_seq"] > 0


def test_retention_thins_points_and_keeps_every_image_intact(
    daemon: Daemon, vault: Path, tmp_path: Path
) -> None:
    daemon.call("POST", "/vms", json={"name": "ret01", "host": "hv01", "disks": ["128M"]})
    _protect(daemon, "ret01", verify_points=True, interval="1s", retention="6s")
    deadline = time.monotonic() + 120
    while daemon.call("GET", "/items/ret01")["cycles"] < 14 and time.monotonic() < deadline:
        time.sleep(0.5)
    points = daemon.call("GET", "/items/ret01/points")
    seqs = [p["seq"] for p in points]
    assert seqs[-1] >= 15 and len(points) < seqs[-1]  # older points were thinned
    assert seqs[0] > 1  # the first ones fell out of the retention window
    chain = vault / "sites" / "cloud" / "replicas" / "ret01" / "d0"
    # Every point's image, exported by qemu-img, still equals its source digest,
    # although files were merged under it; no file is left that no point uses.
    quiet = {"interval": "1h", "retention": "1h"}
    daemon.call("PATCH", "/items/ret01", json=quiet)  # no more scheduled passes
    daemon.call("POST", "/items/ret01/replicate", json={})  # waits for one in flight (item lock)
    points = daemon.call("GET", "/items/ret01/points")
    for point in points:
        raw = _point_raw(vault, "ret01", point, tmp_path / "p.raw")
        with FileDevice.open(raw) as device:
            assert disk_digest(device) == point["source_digests"]["d0"], point["id"]
        raw.unlink()
    used = {p["files"]["d0"] for p in points}
    on_disk = {p.name for p in chain.glob("p*.qcow2")}
    assert on_disk == used and len(used) == len(points)
