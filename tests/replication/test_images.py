"""Hyper-V and VMware disks in (``vm import``) and recovery points out (``point
export``), through qemu-img, checked by digests of the bytes.

A known raw image (data, holes, a written zero region) is converted by
qemu-img into VHDX, VHD and VMDK, as those hypervisors would hand them over;
each imports to a VM whose disk reads exactly as the raw. A recovery point of
a lab VM is exported in every format and each file, read back by qemu-img,
equals the point. Refusals change nothing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw

from ..conftest import Daemon, shut_down
from ..failover.support import protect

MiB = 1 << 20
SIZE = 64 * MiB


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("images") / "vault").start(lab=True)
    try:
        yield running
    finally:
        shut_down(running)


def _digest_as_raw(image: Path, fmt: str, work: Path) -> str:
    """What ``image`` reads as, through qemu-img: its raw conversion's digest."""
    raw = work / f"{image.name}.as.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(raw)], check=True
    )
    try:
        with FileDevice.open(raw) as device:
            return disk_digest(device)
    finally:
        raw.unlink()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 64 MiB raw disk that has lived: random data, a hole, written zeroes."""
    path = tmp_path_factory.mktemp("src") / "legacy.raw"
    create_raw(path, SIZE)
    with FileDevice.open(path, writable=True) as device:
        for offset in (0, 5 * MiB + 4096, 40 * MiB):
            device.write(offset, memoryview(os.urandom(3 * MiB)))
        device.write(20 * MiB, memoryview(bytes(2 * MiB)))  # allocated zeroes
        device.flush()
        return path, disk_digest(device)


@pytest.mark.parametrize(("fmt", "options"), [
    ("vhdx", []), ("vpc", ["-o", "force_size=on"]), ("vmdk", []),
    ("vmdk", ["-o", "subformat=streamOptimized"]),
])  # fmt: skip
def test_a_hyperv_or_vmware_disk_imports_to_a_vm_that_reads_the_same(
    engine: Daemon, source: tuple[Path, str], tmp_path: Path, fmt: str, options: list[str]
) -> None:
    raw, expected = source
    image = tmp_path / f"legacy.{fmt}"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, *options, str(raw), str(image)],
        check=True,
    )
    name = f"imp-{fmt}-{len(options)}"
    vm = engine.call(
        "POST", "/vms/import", json={"name": name, "host": "hv01", "disks": [str(image)]}
    )
    assert (vm["site"], vm["host"], vm["power"]) == ("onprem", "hv01", "stopped")
    assert vm["disks"] == [{"name": "d0", "size": SIZE, "bus": "virtio"}]
    (site,) = [s for s in engine.call("GET", "/sites") if s["name"] == "onprem"]
    disk = Path(site["path"]) / "vms" / name / "disks" / "d0.qcow2"
    assert _digest_as_raw(disk, "qcow2", tmp_path) == expected
    assert image.exists()  # the source is read, never moved


def test_an_import_that_cannot_be_done_leaves_nothing(
    engine: Daemon, source: tuple[Path, str], tmp_path: Path
) -> None:
    raw, _ = source
    text = tmp_path / "notes.vhdx"
    text.write_text("not a disk image\n")
    for disks, field in (([str(text)], "disk"), ([str(tmp_path / "absent.vmdk")], "disk"),
                         ([], "disk")):  # fmt: skip
        status, error = engine.error(
            "POST", "/vms/import", json={"name": "imp-bad", "host": "hv01", "disks": disks}
        )
        assert (status, error["code"], error["details"]["field"]) == (400, "INVALID_INPUT", field)
    # A good image with a bad second one: the first is not half-imported.
    status, error = engine.error(
        "POST", "/vms/import",
        json={"name": "imp-bad", "host": "hv01", "disks": [str(raw), str(text)]},
    )  # fmt: skip
    assert error["code"] == "INVALID_INPUT"
    assert "imp-bad" not in {v["name"] for v in engine.call("GET", "/vms")}
    (site,) = [s for s in engine.call("GET", "/sites") if s["name"] == "onprem"]
    assert not (Path(site["path"]) / "vms" / "imp-bad").exists()
    status, error = engine.error(
        "POST", "/vms/import", json={"name": "web01", "host": "hv01", "disks": [str(raw)]}
    )
    assert (status, error["code"]) == (409, "ALREADY_EXISTS")


def test_every_export_format_reads_back_as_the_point(engine: Daemon, tmp_path: Path) -> None:
    protect(engine, "db01")
    point = engine.call("POST", "/items/db01/replicate", json={"app_consistent": True})["point"]
    (site,) = [s for s in engine.call("GET", "/sites") if s["name"] == "cloud"]
    chain = Path(site["path"]) / "replicas" / "db01" / "d0" / point["files"]["d0"]
    expected = _digest_as_raw(chain, "qcow2", tmp_path)
    readers = {"raw": "raw", "qcow2": "qcow2", "vhdx": "vhdx", "vpc": "vpc", "vmdk": "vmdk",
               "vmdk-stream": "vmdk"}  # fmt: skip
    for fmt, reader in readers.items():
        to = tmp_path / f"db01.{fmt}"
        done = engine.call(
            "POST", f"/items/db01/points/{point['id']}/export", json={"format": fmt, "to": str(to)}
        )
        assert done["site"] == "cloud" and [f["path"] for f in done["files"]] == [str(to)]
        assert _digest_as_raw(to, reader, tmp_path) == expected, fmt
        assert not to.with_name(to.name + ".partial").exists()
    info = subprocess.run(["qemu-img", "info", str(tmp_path / "db01.vmdk-stream")],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "streamOptimized" in info

    # Refusals: an existing file is never replaced, an unknown format is named.
    kept = tmp_path / "db01.raw"
    before = kept.stat().st_mtime_ns
    status, error = engine.error(
        "POST", f"/items/db01/points/{point['id']}/export",
        json={"format": "raw", "to": str(kept)},
    )  # fmt: skip
    assert (status, error["code"]) == (409, "ALREADY_EXISTS") and kept.stat().st_mtime_ns == before
    status, error = engine.error(
        "POST", f"/items/db01/points/{point['id']}/export",
        json={"format": "vdi", "to": str(tmp_path / "x.vdi")},
    )  # fmt: skip
    assert (status, error["details"]["field"]) == (400, "format") and "vhdx" in error["message"]
    assert not (tmp_path / "x.vdi").exists()


def test_two_imports_of_one_name_at_once_make_one_vm_with_its_own_disk(
    engine: Daemon, source: tuple[Path, str], tmp_path: Path
) -> None:
    raw, expected = source
    image = tmp_path / "twin.vhdx"
    subprocess.run(["qemu-img", "convert", "-O", "vhdx", str(raw), str(image)], check=True)
    body = {"name": "imp-twin", "host": "hv01", "disks": [str(image)]}
    assert engine.client is not None
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: engine.client.post("/vms/import", json=body), range(2)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [201, 409], [a.text for a in answers]
    (refused,) = [a for a in answers if a.status_code == 409]
    assert refused.json()["error"]["code"] == "ALREADY_EXISTS"
    (site,) = [s for s in engine.call("GET", "/sites") if s["name"] == "onprem"]
    disk = Path(site["path"]) / "vms" / "imp-twin" / "disks" / "d0.qcow2"
    assert _digest_as_raw(disk, "qcow2", tmp_path) == expected  # the loser deleted nothing
