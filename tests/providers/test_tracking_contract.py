"""The DiskAccess contract (``disk/tracking.py``), run against every implementation.

Each implementation is a :class:`Subject` (the ``subject`` fixture's params):

- ``qsd``: a qemu-storage-daemon serving one fresh 32 MiB qcow2, the access
  the local provider builds; the test writes to the disk through NBD;
- ``libvirt`` (marked ``guest``): the lab guest booted as a domain of a private
  libvirtd (one boot for the module), its journal workload writing ~20 records
  a second to ``vda``; a "write" waits for more records.

Bytes are checked by digest: a view stays as it was frozen while the disk
changes; an incremental view's dirty extents cover every block that changed
since its checkpoint and not the whole disk; a freeze splits the checkpoints;
a new access (a restarted process) finds a view by its tag; a second freeze
with one tag is idempotent; ``cleanup_views`` removes leftovers; ``drop`` is
idempotent; a ``since`` naming a missing checkpoint is BitmapInconsistent; a
read-only check view touches no checkpoint and survives the pass's cleanup.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.digest import block_digests, disk_digest
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.disk.tracking import CHECK_PREFIX, ChangeTracker, DiskAccess, View
from siterecovery.domain.errors import BitmapInconsistent
from siterecovery.providers.local.access import QsdDiskAccess

MiB = 2**20
BLOCK = 64 * 1024
DISK = "d0"


@dataclass
class Subject:
    """One implementation under test: ``access`` to a one-disk VM; ``write``
    changes the disk (returns once the change is on it); ``reopen`` is a new
    access to the same disks, as a restarted process makes."""

    access: DiskAccess
    write: Callable[[], None]
    reopen: Callable[[], DiskAccess]

    @property
    def tracker(self) -> ChangeTracker:
        return self.access.trackers()[DISK]

    def freeze(self, tag: str, new: str | None, since: list[str] | None = None) -> View:
        (view,) = self.access.freeze([(self.tracker, since or [])], tag, new_checkpoint=new)
        return view

    def clean(self) -> None:
        for prefix in ("srv", CHECK_PREFIX):
            self.access.trackers(prefix=prefix)[DISK].cleanup_views()
        self.tracker.drop([b.name for b in self.tracker.bitmaps()])


# The implementations ---------------------------------------------------------------


@pytest.fixture
def qsd_subject() -> Iterator[Subject]:
    root = Path(tempfile.mkdtemp(prefix="srt-", dir="/tmp"))
    image = root / "d0.qcow2"
    qemu_img.create(image, 32 * MiB)
    daemon = StorageDaemon.start(root / "run", [DiskSpec(DISK, image)], detached=False)

    def access() -> DiskAccess:
        return QsdDiskAccess(daemon.qmp(), daemon.nbd_socket, {DISK: DISK}, root / "views", True)

    writes = iter(range(10**6))

    def write() -> None:
        n = next(writes)
        with NbdDevice.connect(daemon.nbd_socket, DISK, writable=True) as device:
            device.write((n * 3 % 30) * MiB + 4096, memoryview(os.urandom(MiB // 2)))
            device.flush()

    try:
        yield Subject(access(), write, access)
    finally:
        daemon.stop(timeout=5)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def libvirt_domain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The lab guest running as a domain of a private libvirtd (one boot)."""
    from siterecovery.providers.libvirt.guest_image import build_guest
    from tests.libvirt.libvirtd import running_hosts, skip_unless_libvirt
    from tests.libvirt.support import boot_lab_guest, connect

    skip_unless_libvirt()
    with running_hosts(tmp_path_factory.mktemp("lv"), ["east"]) as (host,), connect(host) as conn:
        domain, _ = boot_lab_guest(conn, host, build_guest(), "trk01", seed=11)
        yield domain


@pytest.fixture
def libvirt_subject(libvirt_domain: Any) -> Iterator[Subject]:
    from siterecovery.providers.libvirt.tracking import LibvirtDiskAccess

    work = Path(tempfile.mkdtemp(prefix="srl-", dir="/tmp"))

    def access() -> DiskAccess:
        return LibvirtDiskAccess(libvirt_domain, {DISK: "vda"}, work)

    subject = Subject(access(), lambda: guest_writes(libvirt_domain), access)
    subject.clean()
    yield subject
    subject.clean()
    shutil.rmtree(work, ignore_errors=True)


def guest_writes(domain: Any, records: int = 10) -> None:
    """Wait until the guest's workload wrote ``records`` more records."""
    from tests.libvirt.support import wait_until

    start = domain.agent_command("sr-status")["seq"]
    wait_until(lambda: domain.agent_command("sr-status")["seq"] >= start + records, "writes", 60)


@pytest.fixture(params=["qsd", pytest.param("libvirt", marks=pytest.mark.guest)])
def subject(request: pytest.FixtureRequest) -> Subject:
    found: Subject = request.getfixturevalue(f"{request.param}_subject")
    return found


# The contract ------------------------------------------------------------------------


def digest_of(view: View) -> str:
    with view.open() as device:
        return disk_digest(device)


def blocks_of(view: View) -> Any:
    with view.open() as device:
        return block_digests(device, BLOCK)


def test_a_view_stays_as_frozen_while_the_disk_changes(subject: Subject) -> None:
    subject.write()
    view = subject.freeze("t1", "cp1")
    first = digest_of(view)
    subject.write()
    assert digest_of(view) == first
    subject.write()
    assert digest_of(view) == first
    assert not view.has_bitmap
    view.release()


def test_an_incremental_view_reports_what_changed_since_its_checkpoint(subject: Subject) -> None:
    subject.write()
    full = subject.freeze("t1", "cp1")
    before = blocks_of(full)
    full.release()
    subject.write()
    view = subject.freeze("t2", "cp2", ["cp1"])
    assert view.has_bitmap
    after = blocks_of(view)
    with view.open() as device:
        dirty = [(e.start, e.end) for e in device.dirty_extents() if e.dirty]
        size = device.size
    view.release()
    changed = np.flatnonzero((before != after).any(axis=1)) * BLOCK
    assert len(changed) > 0
    assert all(any(s <= offset < e for s, e in dirty) for offset in changed)
    assert sum(e - s for s, e in dirty) < size // 2


def test_a_freeze_starts_the_new_checkpoint_and_stops_the_others(subject: Subject) -> None:
    assert subject.tracker.ensure_tracking("cp0") == "cp0"
    assert subject.tracker.ensure_tracking("other") == "cp0"
    subject.write()
    view = subject.freeze("t1", "cp1", ["cp0"])
    states = {b.name: b for b in subject.tracker.bitmaps()}  # qsd lists newest first.
    assert {name: b.recording for name, b in states.items()} == {"cp0": False, "cp1": True}
    assert all(b.persistent and not b.inconsistent for b in states.values())
    assert states["cp0"].count > 0
    view.release()
    subject.write()
    assert {b.name: b for b in subject.tracker.bitmaps()}["cp1"].count > 0


def test_a_new_access_finds_the_view_by_its_tag(subject: Subject) -> None:
    view = subject.freeze("t1", "cp1")
    frozen = digest_of(view)
    restarted = subject.reopen().trackers()[DISK]
    found = restarted.find_view("t1")
    assert found is not None and found.tag == "t1"
    assert restarted.find_view("t2") is None
    subject.write()
    assert digest_of(found) == frozen
    found.release()
    assert restarted.find_view("t1") is None
    view.release()  # Idempotent.


def test_a_second_freeze_with_the_same_tag_returns_the_same_view(subject: Subject) -> None:
    subject.tracker.ensure_tracking("cp0")
    view = subject.freeze("t1", "cp1", ["cp0"])
    frozen = digest_of(view)
    subject.write()
    again = subject.freeze("t1", "cp1", ["cp0"])
    assert again.has_bitmap and digest_of(again) == frozen
    assert sorted(b.name for b in subject.tracker.bitmaps()) == ["cp0", "cp1"]
    again.release()


def test_cleanup_views_removes_all_but_the_kept_ones(subject: Subject) -> None:
    subject.freeze("t1", "cp1")
    restarted = subject.reopen().trackers()[DISK]
    assert restarted.cleanup_views(keep_tags=["t1"]) == []
    assert restarted.find_view("t1") is not None
    assert len(restarted.cleanup_views()) == 1
    assert restarted.find_view("t1") is None
    assert restarted.cleanup_views() == []
    assert [b.name for b in subject.tracker.bitmaps()] == ["cp1"]


def test_drop_is_idempotent(subject: Subject) -> None:
    subject.tracker.ensure_tracking("cp0")
    subject.freeze("t1", "cp1", ["cp0"]).release()
    subject.tracker.drop(["cp0", "missing"])
    assert [b.name for b in subject.tracker.bitmaps()] == ["cp1"]
    subject.tracker.drop(["cp0"])
    subject.tracker.drop(["cp1", "cp1"])
    assert subject.tracker.bitmaps() == []


def test_a_since_naming_a_missing_checkpoint_is_inconsistent(subject: Subject) -> None:
    subject.tracker.ensure_tracking("cp0")
    with pytest.raises(BitmapInconsistent):
        subject.freeze("t1", "cp1", ["cp0", "gone"])
    assert [b.name for b in subject.tracker.bitmaps()] == ["cp0"]
    assert subject.tracker.find_view("t1") is None


def test_a_read_only_check_view_touches_no_checkpoint(subject: Subject) -> None:
    subject.tracker.ensure_tracking("cp0")
    before = [(b.name, b.recording) for b in subject.tracker.bitmaps()]
    check = subject.access.trackers(prefix=CHECK_PREFIX)[DISK]
    (view,) = subject.access.freeze([(check, [])], "k1", new_checkpoint=None)
    assert not view.has_bitmap
    frozen = digest_of(view)
    assert subject.tracker.cleanup_views() == []  # A pass's cleanup leaves it alone.
    subject.write()
    assert digest_of(view) == frozen
    assert check.find_view("k1") is not None and subject.tracker.find_view("k1") is None
    view.release()
    assert check.find_view("k1") is None
    assert [(b.name, b.recording) for b in subject.tracker.bitmaps()] == before
