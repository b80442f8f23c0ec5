"""qemu-storage-daemon processes and the QMP client, against real daemons."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.qmp import QmpClient
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.domain.errors import DiskError, InvalidInput, QmpError

from .support import NODE, MiB, Served, StartQsd, read, write

SRC = Path(__file__).resolve().parents[2] / "src"


def wait_for(condition: object, what: str, timeout: float = 10.0) -> None:
    """Poll ``condition()`` until true; fail the test after ``timeout`` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen in {timeout} s")
        time.sleep(0.02)


def test_start_serves_each_disk_under_its_node_name(workdir: Path, qsd: StartQsd) -> None:
    for name in ("a", "b"):
        qemu_img.create(workdir / f"{name}.qcow2", 16 * MiB)
    daemon = qsd([DiskSpec("a", workdir / "a.qcow2"), DiskSpec("b", workdir / "b.qcow2")])
    exports = {e["id"]: e["node-name"] for e in daemon.qmp().execute("query-block-exports")}
    assert exports == {"a": "a", "b": "b"}
    assert (daemon.run_dir / "qsd.pid").read_text().strip() == str(daemon.pid)


def test_read_only_disk_is_exported_read_only(workdir: Path, qsd: StartQsd) -> None:
    qemu_img.create(workdir / "ro.qcow2", 16 * MiB)
    daemon = qsd([DiskSpec(NODE, workdir / "ro.qcow2", writable=False)])
    served = Served(daemon, workdir / "ro.qcow2")
    with pytest.raises(DiskError, match="read-only"):
        served.open(writable=True)
    with served.open(writable=False) as device:
        assert read(device, 0, 4) == bytes(4)


def test_raw_disk_can_be_served(workdir: Path, qsd: StartQsd) -> None:
    (workdir / "disk.raw").write_bytes(b"raw!" + bytes(MiB - 4))
    daemon = qsd([DiskSpec(NODE, workdir / "disk.raw", fmt="raw")])
    with Served(daemon, workdir / "disk.raw").open() as device:
        assert device.size == MiB
        assert read(device, 0, 4) == b"raw!"


def test_attach_finds_the_live_daemon(served: Served) -> None:
    attached = StorageDaemon.attach(served.daemon.run_dir)
    assert attached is not None
    assert attached.pid == served.daemon.pid
    assert attached.is_running()
    assert attached.qmp().execute("query-block-exports")[0]["id"] == NODE


def test_stop_ends_the_daemon_and_removes_its_files(served: Served) -> None:
    daemon = served.daemon
    with served.open() as device:
        write(device, 0, 0x42)
        daemon.stop()
    assert not daemon.is_running()
    assert StorageDaemon.attach(daemon.run_dir) is None
    assert sorted(p.name for p in daemon.run_dir.iterdir()) == ["qsd.log"]
    daemon.stop()  # Idempotent.


def test_kill_leaves_stale_files_that_attach_cleans(served: Served) -> None:
    daemon = served.daemon
    daemon.kill()
    daemon.kill()  # Idempotent.
    assert not daemon.is_running()
    assert (daemon.run_dir / "qsd.pid").exists()
    assert StorageDaemon.attach(daemon.run_dir) is None
    assert not (daemon.run_dir / "qsd.pid").exists()
    assert not (daemon.run_dir / "qmp.sock").exists()


def test_a_second_daemon_in_the_same_run_dir_is_refused(served: Served, qsd: StartQsd) -> None:
    with pytest.raises(DiskError, match="already runs"):
        qsd([DiskSpec(NODE, served.image)], run_dir=served.daemon.run_dir)


def test_a_failed_start_leaves_no_daemon(workdir: Path) -> None:
    run_dir = workdir / "run"
    with pytest.raises(DiskError, match=r"missing\.qcow2"):
        StorageDaemon.start(run_dir, [DiskSpec(NODE, workdir / "missing.qcow2")])
    assert StorageDaemon.attach(run_dir) is None
    assert not (run_dir / "qsd.pid").exists()


def test_bad_node_names_are_refused(workdir: Path) -> None:
    with pytest.raises(InvalidInput):
        DiskSpec("1bad", workdir / "x.qcow2")
    with pytest.raises(InvalidInput):
        DiskSpec("x" * 27, workdir / "x.qcow2")


def _start_in_child(run_dir: Path, image: Path, detached: bool) -> int:
    """Start a daemon from a child Python process that then exits; its pid."""
    code = textwrap.dedent(f"""
        from pathlib import Path
        from siterecovery.disk.qsd import DiskSpec, StorageDaemon
        d = StorageDaemon.start(Path({str(run_dir)!r}),
                                [DiskSpec("d0", Path({str(image)!r}))], detached={detached})
        print(d.pid)
    """)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_detached_daemon_outlives_its_parent(workdir: Path) -> None:
    qemu_img.create(workdir / "disk.qcow2", 16 * MiB)
    pid = _start_in_child(workdir / "run", workdir / "disk.qcow2", detached=True)
    daemon = StorageDaemon.attach(workdir / "run")
    try:
        assert daemon is not None
        assert daemon.pid == pid
        assert os.getsid(pid) == pid  # A session of its own.
    finally:
        if daemon is not None:
            daemon.stop()
    assert not daemon.is_running()


def test_attached_daemon_dies_with_its_parent(workdir: Path) -> None:
    qemu_img.create(workdir / "disk.qcow2", 16 * MiB)
    pid = _start_in_child(workdir / "run", workdir / "disk.qcow2", detached=False)
    probe = StorageDaemon(workdir / "run", pid, None)
    try:
        wait_for(lambda: not probe.is_running(), "the daemon's death")
    finally:
        probe.kill()
    assert StorageDaemon.attach(workdir / "run") is None


def test_attached_daemon_outlives_the_thread_that_started_it(workdir: Path) -> None:
    """An agent starts a point's daemon in one operation's thread and writes
    through it from others: the daemon lives as long as the process."""
    qemu_img.create(workdir / "disk.qcow2", 16 * MiB)
    started: list[StorageDaemon] = []
    spec = DiskSpec(NODE, workdir / "disk.qcow2")

    def start() -> None:
        started.append(StorageDaemon.start(workdir / "run", [spec], detached=False))

    starter = threading.Thread(target=start)
    starter.start()
    starter.join()
    assert started, "the daemon did not start"
    daemon = started[0]
    try:
        time.sleep(0.5)  # the parent-death signal, had it been armed on that thread
        assert daemon.is_running()
        with Served(daemon, workdir / "disk.qcow2").open() as device:
            write(device, 0, 0x5A)
            assert read(device, 0, 4) == bytes([0x5A]) * 4
    finally:
        daemon.stop()


def test_qmp_errors_carry_class_and_description(served: Served) -> None:
    with pytest.raises(QmpError) as caught:
        served.daemon.qmp().execute("no-such-command")
    assert caught.value.fields["error_class"] == "CommandNotFound"
    assert isinstance(caught.value, DiskError)
    with pytest.raises(QmpError, match="does not accept value"):
        served.daemon.qmp().execute("blockdev-add", **{"node-name": "x", "driver": "nope"})


def test_qmp_buffers_events_for_wait_event(served: Served) -> None:
    qmp = served.daemon.qmp()
    for export_id in ("e1", "e2"):
        qmp.execute(
            "block-export-add",
            **{"type": "nbd", "id": export_id, "node-name": NODE},
            name=export_id,
        )
    qmp.execute("block-export-del", id="e1")
    qmp.execute("block-export-del", id="e2")
    qmp.execute("query-block-exports")  # Events arrive while waiting for this reply.
    event = qmp.wait_event("BLOCK_EXPORT_DELETED", lambda data: data["id"] == "e2", timeout=5)
    assert event["data"] == {"id": "e2"}
    assert qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=5)["data"] == {"id": "e1"}
    with pytest.raises(DiskError, match="in time"):
        qmp.wait_event("BLOCK_EXPORT_DELETED", timeout=0.1)


def test_the_monitor_serves_one_client_shared_in_the_process(served: Served) -> None:
    shared = served.daemon.qmp()
    attached = StorageDaemon.attach(served.daemon.run_dir)
    assert attached is not None
    assert attached.qmp() is shared
    with pytest.raises(DiskError, match="no greeting"):
        QmpClient.connect(served.daemon.qmp_socket, timeout=0.3)
    shared.close()
    shared.close()  # Idempotent.
    with pytest.raises(DiskError, match="closed"):
        shared.execute("query-block-exports")
    again = served.daemon.qmp()
    assert again is not shared
    assert again.execute("query-block-exports")


def test_qmp_connect_to_nothing_is_a_disk_error(workdir: Path) -> None:
    with pytest.raises(DiskError, match="cannot connect"):
        QmpClient.connect(workdir / "nothing.sock", timeout=1)
