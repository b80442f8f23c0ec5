"""`vm check` of a running VM: checked through a point-in-time view, it never
reports corruption that is not there, and still finds corruption that is.

A real daemon, the lab's VMs with their workloads writing fast, real
qemu-storage-daemons; replication runs every second meanwhile, so the check's
views and the passes' views share the VM's daemon."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.disk.nbd import NbdDevice
from siterecovery.providers.local import journal

from ..conftest import Daemon, _stop_vms
from .test_protect_e2e import _vm_run

FAST_RATE = "200"  # records per second, each 4 to 64 KiB (conftest default: 50)
LIVE_CHECKS = 20


@pytest.fixture
def fast_daemon(vault: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """The lab with workloads writing at FAST_RATE records per second."""
    monkeypatch.setenv("SITERECOVERY_WORKLOAD_RATE", FAST_RATE)
    running = Daemon(vault).start(lab=True)
    yield running
    try:
        running.call("POST", "/lab/down")
    finally:
        running.stop()
        _stop_vms(vault)


def test_live_checks_are_consistent_while_the_guest_writes_and_replication_runs(
    fast_daemon: Daemon,
) -> None:
    daemon = fast_daemon
    body = {"vm": "web01", "to": "cloud", "interval": "1s"}
    job = daemon.wait_job(daemon.call("POST", "/items", json=body)["job"])
    assert job["state"] == "succeeded", job
    cycles = daemon.call("GET", "/items/web01")["cycles"]

    reports = [daemon.call("GET", "/vms/web01/check") for _ in range(LIVE_CHECKS)]
    bad = [r for r in reports if not r["consistent"]]
    assert not bad, bad[0]["errors"]
    assert {r["image"] for r in reports} == {"point-in-time view of the running VM"}
    seqs = [r["last_seq"] for r in reports]
    assert seqs == sorted(seqs) and seqs[-1] > seqs[0]  # the guest kept writing
    assert all(r["records_checked"] > 0 for r in reports)

    # The linked pair frozen together (follower first): no dangling link.
    for _ in range(5):
        both = daemon.call("GET", "/checks", params={"vm": ["db01", "web01", "db01"]})
        assert both["consistent"], both

    # The checks disturbed neither replication nor its change tracking.
    item = daemon.call("GET", "/items/web01")
    assert item["cycles"] > cycles and item["last_error"] is None, item
    last = daemon.call("GET", "/items/web01/points")[-1]
    assert daemon.call("GET", "/vms/web01/check", params={"point": last["id"]})["consistent"]
    assert item["last_pass"]["d0"]["tracking"] == "bitmap"
    leftovers = list((Path(daemon.vault) / "sites/onprem/vms/web01/fleece").glob("srk*"))
    assert not leftovers


def test_a_check_still_finds_real_corruption_live_and_stopped(
    fast_daemon: Daemon, vault: Path
) -> None:
    daemon = fast_daemon
    first = daemon.call("GET", "/vms/web01/check")
    assert first["consistent"], first["errors"]
    socket = _vm_run(vault, "web01") / "nbd.sock"
    with NbdDevice.connect(socket, "d0", writable=True) as live:
        superblock = journal.read_superblock(live)
        assert superblock is not None
        victim = journal.plan_record(superblock, first["last_seq"] - 5)
        assert victim.disk == 0
        live.write(victim.offset, memoryview(os.urandom(4096)))
        live.flush()

    time.sleep(0.5)  # the guest writes on
    live_report = daemon.call("GET", "/vms/web01/check")
    assert not live_report["consistent"]
    assert any("bytes of its data differ" in e for e in live_report["errors"]), live_report

    daemon.call("POST", "/vms/web01/stop")
    stopped = daemon.call("GET", "/vms/web01/check")
    assert stopped["image"] == "stopped VM"
    assert not stopped["consistent"]
    assert any("bytes of its data differ" in e for e in stopped["errors"]), stopped
