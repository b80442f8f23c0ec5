"""A guest that cannot quiesce still gets its point: crash-consistent, and the
item says why.

Real lab VMs (qemu-storage-daemon and their journal workload). The guest's
agent channel is its workload's control socket; moving that socket away is a
channel that breaks under a running guest (as a virtio-serial port whose
agent died), and moving it back mends it. The pass asked for an
app-consistent point does not fail for it: it seals a crash-consistent point
whose journal is consistent, with ``quiesce`` ``freeze-failed: WHY`` in the
report and ``last_quiesce`` on the item, and the next pass with the channel
back is app-consistent again. A VM without guest tools says
``no-guest-agent``; a group's common point is crash-consistent for every
member as soon as one member did not quiesce, and each member's item names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from siterecovery.domain.model import Site, SiteRole
from siterecovery.providers.local.provider import LocalProvider

from ..conftest import Daemon


def _protect(daemon: Daemon, vm: str) -> None:
    body = {"vm": vm, "to": "cloud", "interval": "1h"}
    job = daemon.wait_job(daemon.call("POST", "/items", json=body)["job"])
    assert job["state"] == "succeeded", job


@contextmanager
def _channel_broken(vault: Path, vm: str) -> Iterator[None]:
    """The VM's guest channel gone while its guest runs, then back."""
    site = Site("onprem", "local", str(vault / "sites" / "onprem"), SiteRole.ON_PREMISES)
    socket = LocalProvider().run_dir(site, f"vm-{vm}") / "workload.sock"
    moved = socket.with_name("workload.sock.away")
    socket.rename(moved)
    try:
        yield
    finally:
        moved.rename(socket)


def _replicate(daemon: Daemon, vm: str) -> dict[str, Any]:
    report: dict[str, Any] = daemon.call(
        "POST", f"/items/{vm}/replicate", json={"app_consistent": True}
    )
    return report


def test_a_failed_freeze_gives_a_crash_consistent_point_and_says_why(
    daemon: Daemon, vault: Path
) -> None:
    _protect(daemon, "web01")
    with _channel_broken(vault, "web01"):
        report = _replicate(daemon, "web01")
    point = report["point"]
    assert report["quiesce"].startswith("freeze-failed: "), report
    assert "does not answer" in report["quiesce"], report
    assert point["type"] == "crash-consistent" and point["workload_seq"] is None, point
    assert daemon.call("GET", "/items/web01")["last_quiesce"] == report["quiesce"]
    checked = daemon.call("GET", "/vms/web01/check", params={"point": point["id"]})
    assert checked["consistent"], checked

    again = _replicate(daemon, "web01")  # the channel is back
    assert again["quiesce"] == "quiesced", again
    assert again["point"]["type"] == "app-consistent", again
    assert again["point"]["workload_seq"] >= 1, again
    assert daemon.call("GET", "/items/web01")["last_quiesce"] == "quiesced"


def test_a_vm_without_guest_tools_says_so(daemon: Daemon) -> None:
    daemon.call(
        "POST", "/vms", json={"name": "raw01", "host": "hv01", "disks": ["64M"], "workload": False}
    )
    _protect(daemon, "raw01")
    report = _replicate(daemon, "raw01")
    assert report["quiesce"] == "no-guest-agent", report
    assert report["point"]["type"] == "crash-consistent", report
    crash = daemon.call("POST", "/items/raw01/replicate", json={"app_consistent": False})
    assert crash["quiesce"] == "not-asked", crash
    assert daemon.call("GET", "/items/raw01")["last_quiesce"] == "not-asked"


def test_a_group_point_is_crash_consistent_when_one_member_did_not_quiesce(
    daemon: Daemon, vault: Path
) -> None:
    for vm in ("web01", "db01"):
        _protect(daemon, vm)
    daemon.call("POST", "/groups", json={"name": "app", "vms": ["web01", "db01"]})
    with _channel_broken(vault, "db01"):
        common = daemon.call("POST", "/groups/app/point", json={})
    assert common["type"] == "crash-consistent", common
    assert common["quiesce"]["web01"] == "quiesced", common  # it did; the group did not
    assert common["quiesce"]["db01"].startswith("freeze-failed: "), common
    for vm in ("web01", "db01"):
        said = daemon.call("GET", f"/items/{vm}")["last_quiesce"]
        assert said.startswith("group-not-quiesced: db01: freeze-failed: "), (vm, said)
        point = daemon.call("GET", f"/items/{vm}/points")[-1]
        assert point["id"] == common["points"][vm] and point["type"] == "crash-consistent"
    # Every guest thawed: the next common point quiesces them all again.
    assert daemon.call("POST", "/groups/app/point", json={})["type"] == "app-consistent"
