"""What only libvirt's DiskAccess does, on the lab guest (one boot for the module).

The DiskAccess contract itself runs in ``tests/providers/test_tracking_contract.py``
(param ``libvirt``). Here: one backup job per domain (a second view is refused
at once with DISK_VIEW_BUSY, a check's cleanup leaves a pass's view alone);
what a crashed process left is found and removed; socket paths stay short;
checkpoints broken by a qemu crash are reported inconsistent and can be
dropped; and the bytes of a view are the guest's disk at the freeze instant:
frozen under fsFreeze, its copy holds a consistent journal up to the seq the
guest had written.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.disk.tracking import CHECK_PREFIX, ChangeTracker
from siterecovery.domain.errors import BitmapInconsistent, DiskViewBusy
from siterecovery.providers.libvirt.guest_image import GuestImage
from siterecovery.providers.local import journal

from .libvirtd import LibvirtHost
from .support import boot_lab_guest, connect, journal_of, shut_down, wait_until, workload_status

pytestmark = pytest.mark.guest
MiB = 2**20


@pytest.fixture(scope="module")
def lab(libvirt_host: LibvirtHost, guest_image: GuestImage) -> Iterator[tuple[Any, Any]]:
    """The lab guest running on ``libvirt_host``: (connection, domain)."""
    with connect(libvirt_host) as conn:
        domain, _ = boot_lab_guest(conn, libvirt_host, guest_image, "trk02", seed=13)
        yield conn, domain


@pytest.fixture
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("w"))


def access_of(domain: Any, work: Path) -> Any:
    from siterecovery.providers.libvirt.tracking import LibvirtDiskAccess

    return LibvirtDiskAccess(domain, {"d0": "vda"}, work)


@pytest.fixture
def access(lab: tuple[Any, Any], work: Path) -> Iterator[Any]:
    found = access_of(lab[1], work)
    yield found
    if lab[1].state() != "running":
        return  # The last test shut the guest down.
    for prefix in ("srv", CHECK_PREFIX):
        found.trackers(prefix=prefix)["d0"].cleanup_views()
    tracker = found.trackers()["d0"]
    tracker.drop([b.name for b in tracker.bitmaps()])


def tracker_of(access: Any, prefix: str = "srv") -> ChangeTracker:
    found: ChangeTracker = access.trackers(prefix=prefix)["d0"]
    return found


def test_one_backup_job_per_domain(access: Any, work: Path) -> None:
    tracker = tracker_of(access)
    (view,) = access.freeze([(tracker, [])], "t1", new_checkpoint="cp1")
    # Refused by us (DiskViewBusy), not by libvirt's job lock after 30 s (a GuestError).
    with pytest.raises(DiskViewBusy) as refused:
        access.freeze([(tracker, [])], "t2", new_checkpoint="cp2")
    assert "domjobabort" in str(refused.value) and refused.value.code == "DISK_VIEW_BUSY"
    check = tracker_of(access, CHECK_PREFIX)
    with pytest.raises(DiskViewBusy):
        access.freeze([(check, [])], "k1", new_checkpoint=None)
    assert check.cleanup_views() == []  # A check's cleanup leaves the pass's view alone.
    assert [b.name for b in tracker.bitmaps()] == ["cp1"]  # cp2 was never created.
    assert list(work.glob("*.qcow2")) != []  # libvirt's scratch file of the job.
    view.release()
    assert list(work.glob("*")) == []  # Scratch file and socket are gone.
    (again,) = access.freeze([(tracker, ["cp1"])], "t2", new_checkpoint="cp2")
    assert again.has_bitmap
    again.release()


def test_what_a_crashed_process_left_is_removed(lab: tuple[Any, Any], work: Path) -> None:
    _, domain = lab
    crashed = access_of(domain, work)
    crashed.freeze([(tracker_of(crashed), [])], "t1", new_checkpoint="cp1")
    (work / "srv0123456789-vda.qcow2").write_bytes(b"left by a crash")
    restarted = access_of(domain, work)
    tracker = tracker_of(restarted)
    assert tracker.find_view("t1") is not None
    assert len(tracker.cleanup_views()) == 1
    assert domain.backup_xml() is None
    assert list(work.glob("*")) == []
    tracker.drop(["cp1"])


def test_a_long_work_dir_keeps_its_sockets_short(lab: tuple[Any, Any], work: Path) -> None:
    deep = work / ("x" * 60) / ("y" * 60)
    access = access_of(lab[1], deep)
    assert len(str(access.socket_dir)) < 80
    (view,) = access.freeze([(tracker_of(access), [])], "t1", new_checkpoint=None)
    with view.open() as device:
        assert device.size == 64 * MiB
    view.release()
    assert list(deep.glob("*")) == []


def test_checkpoints_broken_by_a_qemu_crash_are_inconsistent(
    lab: tuple[Any, Any], libvirt_host: LibvirtHost, access: Any
) -> None:
    _, domain = lab
    tracker = tracker_of(access)
    tracker.ensure_tracking("cp0")
    access.freeze([(tracker, ["cp0"])], "t1", new_checkpoint="cp1")[0].release()
    for pid in libvirt_host.qemu_pids():
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: domain.state() == "shutoff", "the crash", 30.0)
    domain.start()
    wait_until(lambda: workload_status(domain), "the workload after the crash", 180.0)
    states = tracker.bitmaps()
    assert [(b.name, b.inconsistent, b.count) for b in states] == [
        ("cp0", True, 0),
        ("cp1", True, 0),
    ]
    with pytest.raises(BitmapInconsistent):
        access.freeze([(tracker, ["cp1"])], "t2", new_checkpoint="cp2")
    tracker.drop(["cp0", "cp1"])  # cp1's bitmap is gone: metadata only.
    assert tracker.bitmaps() == []
    assert tracker.ensure_tracking("cp3") == "cp3"
    assert [b.inconsistent for b in tracker.bitmaps()] == [False]


def test_a_view_holds_the_guest_disk_of_the_freeze_instant(
    lab: tuple[Any, Any], access: Any, work: Path
) -> None:
    _, domain = lab
    tracker = tracker_of(access)
    assert domain.fs_freeze() == 1
    try:
        seq = domain.agent_command("sr-status")["seq"]
        (view,) = access.freeze([(tracker, [])], "t1", new_checkpoint="cp1")
    finally:
        domain.fs_thaw()
    copy = work.parent / "view-copy.raw"
    with view.open() as device:
        frozen = disk_digest(device)
        create_raw(copy, device.size)
        with FileDevice.open(copy, writable=True) as target:
            copy_device(device, target)
    wait_until(lambda: domain.agent_command("sr-status")["seq"] > seq + 20, "writes", 60.0)
    with view.open() as device:
        assert disk_digest(device) == frozen
    view.release()
    last = domain.agent_command("sr-status")["seq"]
    shut_down(domain)
    with FileDevice.open(copy) as device:
        assert disk_digest(device) == frozen
        report = journal.check([device])
    assert report.consistent, report.errors
    assert seq <= report.last_seq < last
    live = journal_of(Path(domain_disk(domain)), work)
    assert live.consistent and live.last_seq >= last
    print(f"\nfrozen at seq {seq}: view's journal to seq {report.last_seq}, live to {last}")


def copy_device(source: Any, target: Any) -> None:
    buf = memoryview(bytearray(4 * MiB))
    for extent in source.extents():
        if extent.zero:
            continue
        for offset in range(extent.start, extent.end, len(buf)):
            piece = buf[: min(len(buf), extent.end - offset)]
            source.readinto(offset, piece)
            target.write(offset, piece)


def domain_disk(domain: Any) -> str:
    from siterecovery.providers.libvirt.domains import parse_domain

    path = parse_domain(domain.xml()).disks[0].path
    assert path is not None
    return str(path)
