"""Checkpoints and point-in-time views on real qemu-storage-daemon processes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.base import Extent
from siterecovery.disk.checkpoints import PointInTimeView, Tracker, freeze_together
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.disk.tracking import CHECK_PREFIX
from siterecovery.domain.errors import BitmapInconsistent, DiskError

from .support import NODE, KiB, MiB, Served, StartQsd, digest, pattern, read, sha, write

BLOCK = 64 * KiB  # Bitmap granularity of a qcow2 with 64 KiB clusters.


@pytest.fixture
def live(served: Served) -> Iterator[NbdDevice]:
    device = served.open()
    yield device
    device.close()


def tracker_of(daemon: StorageDaemon, workdir: Path) -> Tracker:
    return Tracker.of(daemon, NODE, workdir / "views")


@pytest.fixture
def tracker(served: Served, workdir: Path) -> Tracker:
    return tracker_of(served.daemon, workdir)


def dirty_ranges(view: PointInTimeView) -> list[tuple[int, int]]:
    with view.open() as device:
        return [(e.start, e.end) for e in device.dirty_extents() if e.dirty]


def states(tracker: Tracker) -> dict[str, tuple[bool, bool, int]]:
    """name -> (recording, inconsistent, count)."""
    return {b.name: (b.recording, b.inconsistent, b.count) for b in tracker.bitmaps()}


def restart(served: Served, qsd: StartQsd, *, clean: bool) -> StorageDaemon:
    """Stop (SIGTERM) or kill (SIGKILL) the daemon, then serve the image again."""
    if clean:
        served.daemon.stop()
    else:
        served.daemon.kill()
    return qsd([DiskSpec(NODE, served.image)], run_dir=served.daemon.run_dir)


def test_the_view_reads_the_past_while_the_live_disk_moves_on(
    live: NbdDevice, tracker: Tracker
) -> None:
    write(live, 0, 0xAA, MiB)
    write(live, 7 * MiB + 5, 0xAA, 100)
    before = digest(live)
    view = tracker.freeze("t1", new_checkpoint="cp1", since=[])
    write(live, 0, 0xBB, MiB)
    write(live, 20 * MiB, 0xBB, MiB)
    with view.open() as device:
        assert digest(device) == before
        assert read(device, 7 * MiB + 5, 100) == b"\xaa" * 100
        assert [(e.start, e.end) for e in device.extents() if not e.zero] == [
            (0, MiB),
            (7 * MiB, 7 * MiB + BLOCK),
        ]
    assert read(live, 0, 2) == b"\xbb\xbb"
    assert read(live, 20 * MiB, 1) == b"\xbb"
    view.release()


def test_a_first_freeze_has_no_bitmap_and_starts_tracking(
    live: NbdDevice, tracker: Tracker
) -> None:
    view = tracker.freeze("t1", new_checkpoint="cp1", since=[])
    assert not view.has_bitmap
    with view.open() as device, pytest.raises(DiskError):
        list(device.dirty_extents())
    write(live, 3 * MiB, 1)
    assert states(tracker) == {"cp1": (True, False, BLOCK)}


def test_dirty_extents_are_the_writes_before_the_freeze(live: NbdDevice, tracker: Tracker) -> None:
    assert tracker.ensure_tracking("cp1") == "cp1"
    write(live, 0, 1)
    write(live, 5 * MiB, 1, 2 * BLOCK)
    live.write(9 * MiB + 100, memoryview(b"tiny"))
    view = tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"])
    write(live, 12 * MiB, 2)
    assert view.has_bitmap
    assert dirty_ranges(view) == [
        (0, BLOCK),
        (5 * MiB, 5 * MiB + 2 * BLOCK),
        (9 * MiB, 9 * MiB + BLOCK),
    ]
    assert states(tracker) == {"cp1": (False, False, 4 * BLOCK), "cp2": (True, False, BLOCK)}
    with view.open() as device, device.clone() as clone:
        assert list(clone.dirty_extents(0, 2 * BLOCK)) == [
            Extent(0, BLOCK, zero=False, dirty=True),
            Extent(BLOCK, BLOCK, zero=False, dirty=False),
        ]
    view.release()


def test_successive_freezes_chain(live: NbdDevice, tracker: Tracker) -> None:
    tracker.ensure_tracking("cp1")
    write(live, 0, 1)
    first = tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"])
    assert dirty_ranges(first) == [(0, BLOCK)]
    first.release()
    tracker.drop(["cp1"])
    write(live, MiB, 2)
    second = tracker.freeze("t2", new_checkpoint="cp3", since=["cp2"])
    write(live, 2 * MiB, 3)
    assert dirty_ranges(second) == [(MiB, MiB + BLOCK)]
    with second.open() as device:
        assert read(device, MiB, 1) == b"\x02"
        assert read(device, 2 * MiB, 1) == b"\0"
    assert states(tracker) == {"cp2": (False, False, BLOCK), "cp3": (True, False, BLOCK)}
    second.release()


def test_a_failed_cycle_keeps_its_changes_for_the_next(live: NbdDevice, tracker: Tracker) -> None:
    tracker.ensure_tracking("cp1")
    write(live, 0, 1)
    tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"]).release()  # Not sealed.
    write(live, 4 * MiB, 2)
    retry = tracker.freeze("t2", new_checkpoint="cp3", since=["cp1", "cp2"])
    assert dirty_ranges(retry) == [(0, BLOCK), (4 * MiB, 4 * MiB + BLOCK)]
    retry.release()


def test_freeze_with_the_same_tag_returns_the_same_view(
    served: Served, live: NbdDevice, tracker: Tracker, workdir: Path
) -> None:
    tracker.ensure_tracking("cp1")
    write(live, 0, 1)
    view = tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"])
    write(live, 0, 2)
    # Our engine restarts while the daemon keeps running: a new tracker.
    again = tracker_of(served.daemon, workdir).freeze("t1", new_checkpoint="cp2", since=["cp1"])
    assert again.export == view.export
    assert again.has_bitmap
    assert set(states(tracker)) == {"cp1", "cp2"}
    assert tracker.find_view("t1") is not None
    with again.open() as device:
        assert read(device, 0, 1) == b"\x01"
    again.release()
    assert tracker.find_view("t1") is None


def test_an_interrupted_freeze_is_completed_not_redone(
    served: Served, live: NbdDevice, tracker: Tracker
) -> None:
    tracker.ensure_tracking("cp1")
    write(live, 0, 1)
    view = tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"])
    served.daemon.qmp().execute("block-export-del", id=view.export)  # Crash before the export.
    write(live, 0, 2)
    assert tracker.find_view("t1") is None
    resumed = tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"])
    assert dirty_ranges(resumed) == [(0, BLOCK)]
    with resumed.open() as device:
        assert read(device, 0, 1) == b"\x01"
    resumed.release()


def test_release_is_idempotent_and_removes_everything(
    served: Served, live: NbdDevice, tracker: Tracker, workdir: Path
) -> None:
    tracker.ensure_tracking("cp1")
    write(live, 0, 1)
    view = tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"])
    reader = view.open()
    view.release()
    view.release()
    with pytest.raises(DiskError):
        read(reader, 0, 1)  # Open connections are cut.
    reader.close()
    with pytest.raises(DiskError):
        view.open()
    qmp = served.daemon.qmp()
    assert [e["id"] for e in qmp.execute("query-block-exports")] == [NODE]
    assert qmp.execute("query-block-jobs") == []
    assert view.export not in {n["node-name"] for n in qmp.execute("query-named-block-nodes")}
    assert set(states(tracker)) == {"cp1", "cp2"}
    assert list((workdir / "views").iterdir()) == []


def test_freeze_refuses_missing_or_existing_checkpoints(live: NbdDevice, tracker: Tracker) -> None:
    tracker.ensure_tracking("cp1")
    with pytest.raises(BitmapInconsistent):
        tracker.freeze("t1", new_checkpoint="cp2", since=["nope"])
    with pytest.raises(DiskError, match="already exists"):
        tracker.freeze("t1", new_checkpoint="cp1", since=[])
    assert tracker.find_view("t1") is None
    assert states(tracker) == {"cp1": (True, False, 0)}


def test_sigterm_keeps_the_checkpoints_and_their_changes(
    served: Served, qsd: StartQsd, live: NbdDevice, workdir: Path
) -> None:
    tracker = tracker_of(served.daemon, workdir)
    tracker.ensure_tracking("cp1")
    write(live, 0, 1)
    tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"]).release()
    write(live, 4 * MiB, 2)
    live.close()
    daemon = restart(served, qsd, clean=True)
    tracker = tracker_of(daemon, workdir)
    assert states(tracker) == {"cp1": (False, False, BLOCK), "cp2": (True, False, BLOCK)}
    view = tracker.freeze("t2", new_checkpoint="cp3", since=["cp1", "cp2"])
    assert dirty_ranges(view) == [(0, BLOCK), (4 * MiB, 4 * MiB + BLOCK)]
    view.release()


def test_sigkill_leaves_the_checkpoints_inconsistent(
    served: Served, qsd: StartQsd, live: NbdDevice, workdir: Path
) -> None:
    tracker = tracker_of(served.daemon, workdir)
    tracker.ensure_tracking("cp1")
    live.close()
    daemon = restart(served, qsd, clean=True)  # cp1 is now stored in the image.
    tracker = tracker_of(daemon, workdir)
    with Served(daemon, served.image).open() as device:
        write(device, 0, 1)
    tracker.ensure_tracking("cp9")  # Created since the last clean start.
    daemon = restart(Served(daemon, served.image), qsd, clean=False)
    tracker = tracker_of(daemon, workdir)
    assert states(tracker) == {"cp1": (False, True, 0)}  # cp9 is gone.
    assert [b.in_use for b in qemu_img.bitmaps(served.image)] == [True]
    with pytest.raises(BitmapInconsistent):
        tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"])
    tracker.drop(["cp1"])
    assert tracker.ensure_tracking("cp2") == "cp2"
    assert states(tracker) == {"cp2": (True, False, 0)}


def test_ensure_tracking_keeps_a_recording_checkpoint(tracker: Tracker) -> None:
    assert tracker.ensure_tracking("cp1") == "cp1"
    assert tracker.ensure_tracking("cp2") == "cp1"
    tracker.freeze("t1", new_checkpoint="cp2", since=[]).release()
    assert tracker.ensure_tracking("cp3") == "cp2"
    tracker.drop(["cp2", "cp2", "unknown"])
    with pytest.raises(DiskError, match="stopped"):
        tracker.ensure_tracking("cp1")
    assert states(tracker) == {"cp1": (False, False, 0)}


def test_cleanup_removes_views_of_crashed_runs_only(
    served: Served, live: NbdDevice, tracker: Tracker, workdir: Path
) -> None:
    write(live, 0, 1)
    kept = tracker.freeze("keep", new_checkpoint="cp1", since=[])
    stale = tracker.freeze("stale", new_checkpoint="cp2", since=[])
    served.daemon.qmp().execute("block-export-del", id=stale.export)  # Half torn down.
    write(live, 0, 2)
    assert tracker.cleanup_views(keep_tags=["keep"]) == [stale.export]
    assert tracker.cleanup_views(keep_tags=["keep"]) == []
    assert not (workdir / "views" / f"{stale.export}.qcow2").exists()
    with kept.open() as device:
        assert read(device, 0, 1) == b"\x01"
    assert tracker.cleanup_views() == [kept.export]
    assert list((workdir / "views").iterdir()) == []


def test_views_of_two_disks_do_not_mix(workdir: Path, qsd: StartQsd) -> None:
    for name in ("a", "b"):
        qemu_img.create(workdir / f"{name}.qcow2", 8 * MiB)
    daemon = qsd([DiskSpec("a", workdir / "a.qcow2"), DiskSpec("b", workdir / "b.qcow2")])
    tracker_a = Tracker.of(daemon, "a", workdir / "views")
    tracker_b = Tracker.of(daemon, "b", workdir / "views")
    view_a = tracker_a.freeze("t", new_checkpoint="cp1", since=[])
    view_b = tracker_b.freeze("t", new_checkpoint="cp1", since=[])
    assert view_a.export != view_b.export
    assert tracker_a.cleanup_views() == [view_a.export]
    assert tracker_b.find_view("t") is not None
    with NbdDevice.connect(daemon.nbd_socket, "a", writable=True) as device:
        device.write(0, pattern(7, BLOCK))
    with view_b.open() as device:
        assert digest(device) == sha(bytes(8 * MiB))
    view_b.release()


def test_a_clean_stop_during_a_view_keeps_the_checkpoints(
    served: Served, qsd: StartQsd, live: NbdDevice, workdir: Path
) -> None:
    tracker = tracker_of(served.daemon, workdir)
    tracker.ensure_tracking("cp1")
    write(live, 0, 1)
    view = tracker.freeze("t1", new_checkpoint="cp2", since=["cp1"])
    reader = view.open()
    write(live, MiB, 2)
    live.close()
    daemon = restart(served, qsd, clean=True)  # With the view still exported.
    reader.close()
    tracker = tracker_of(daemon, workdir)
    assert states(tracker) == {"cp1": (False, False, BLOCK), "cp2": (True, False, BLOCK)}
    assert tracker.find_view("t1") is None
    assert tracker.cleanup_views() == [view.export]  # Its fleece file was left.
    assert list((workdir / "views").iterdir()) == []


def test_a_check_view_and_a_pass_view_of_one_disk_can_come_and_go_at_once(
    served: Served, live: NbdDevice, workdir: Path
) -> None:
    """A live `vm check` (its own prefix) and replication passes freeze and
    release views of the same node from two threads while the guest writes:
    every view reads the disk of its instant, and no QMP sequence of one
    breaks the other's (CI saw 'Permission conflict on node d0' when a fleece
    was added while another view's backup job was being set up or torn down)."""
    write(live, 0, 0x11, 2 * MiB)
    passes = tracker_of(served.daemon, workdir)
    checks = Tracker(served.daemon.qmp(), NODE, workdir / "checks", served.daemon.nbd_socket,
                     prefix=CHECK_PREFIX)  # fmt: skip
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        byte = 0
        while not stop.is_set():
            byte = (byte + 1) % 250
            write(live, (byte % 32) * BLOCK, byte + 1, BLOCK)

    def loop(tracker: Tracker, kind: str) -> None:
        try:
            for i in range(25):
                if kind == "pass":
                    view = tracker.freeze(f"{kind}{i}", new_checkpoint=f"c{i}", since=[])
                else:
                    view = freeze_together([(tracker, [])], f"{kind}{i}", new_checkpoint=None)[0]
                try:
                    with view.open() as device:
                        assert device.size == served_size(served)
                        read(device, 0, BLOCK)
                finally:
                    view.release()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=loop, args=(t, k)) for t, k in ((passes, "pass"), (checks, "check"))
    ]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join(timeout=300)
    stop.set()
    threads[0].join(timeout=30)
    assert errors == []
    assert passes.cleanup_views() == [] and checks.cleanup_views() == []


def served_size(served: Served) -> int:
    return qemu_img.info(served.image)["virtual-size"]
