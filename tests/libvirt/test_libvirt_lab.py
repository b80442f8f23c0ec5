"""``lab up --provider libvirt``: the lab's two sites with real Linux guests.

``serve --lab --lab-provider libvirt`` (``make run LAB_PROVIDER=libvirt``)
with the lab's site agents: each lab host is a private libvirtd under
``VAULT/lab-hosts`` (its own mount and network namespace), added as a kvm
host with the lab's switch as a libvirt network, and web01 and db01 are lab
guests booted under TCG on hv01, writing their journal on /dev/vda. The test
protects web01 and checks a tracked point by its journal, then takes the lab
down (every daemon and qemu gone) and up again (the hosts come back with
their networks and the guests run again), and refuses to turn the lab's kvm
hosts into local ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.domain.errors import GuestError, HypervisorError, VmNotFound
from siterecovery.providers.libvirt.connection import connect
from siterecovery.providers.libvirt.guest_image import GuestImage
from siterecovery.providers.libvirt.private import PrivateLibvirtd

from ..conftest import Daemon, shut_down
from ..failover.support import job, step
from .libvirtd import mounts_of, skip_unless_libvirt
from .support import AGENT_TIMEOUT, wait_until

pytestmark = pytest.mark.guest

HOSTS = {"onprem": "hv01", "cloud": "cloud-host"}


def _lab_host(vault: Path, name: str) -> PrivateLibvirtd:
    return PrivateLibvirtd(vault / "lab-hosts" / name, name)


@pytest.fixture(scope="module")
def lab(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The engine serving a libvirt lab with its two site agents."""
    skip_unless_libvirt()
    root = tmp_path_factory.mktemp("lvlab")
    daemon = Daemon(root / "vault")
    try:
        daemon.start(
            lab=True, timeout=600.0,
            env={"SITERECOVERY_LAB_PROVIDER": "libvirt", "SITERECOVERY_LAB_AGENTS": "1"},
        )  # fmt: skip
        yield daemon
    finally:
        try:
            shut_down(daemon)
        finally:
            for name in HOSTS.values():  # Even if the engine could not stop them.
                _lab_host(daemon.vault, name).stop()
    assert mounts_of(root) == []


def _status(vault: Path, host: str, vm: str) -> dict[str, Any] | None:
    """The lab guest's ``sr-status`` through its host's libvirt; None while
    the domain, its host or its agent is not there."""
    try:
        with connect(_lab_host(vault, host).uri) as conn:
            found: dict[str, Any] = conn.domain(vm).agent_command("sr-status", timeout=5)
    except (GuestError, HypervisorError, VmNotFound):
        return None
    return found


def _writing(vault: Path, host: str, vm: str, past: int = 0) -> int:
    def reached() -> int | None:
        status = _status(vault, host, vm)
        return int(status["seq"]) if status and int(status["seq"]) > past else None

    found: int = wait_until(reached, f"{vm} writing past seq {past}", AGENT_TIMEOUT)
    return found


def test_the_lab_runs_real_guests_on_private_libvirt_hosts(lab: Daemon) -> None:
    hosts = {h["name"]: h for h in lab.call("GET", "/hosts")}
    for site, name in HOSTS.items():
        assert hosts[name]["site"] == site and hosts[name]["kind"] == "kvm", hosts[name]
        assert hosts[name]["uri"] == _lab_host(lab.vault, name).uri
        assert "vswitch-prod" in hosts[name]["switches"], hosts[name]
    vms = {v["name"]: v for v in lab.call("GET", "/vms")}
    assert {vms["web01"]["host"], vms["db01"]["host"]} == {"hv01"}
    assert vms["web01"]["power"] == "running", vms["web01"]

    def agents_reachable() -> bool:
        sites = {s["name"]: s for s in lab.call("GET", "/sites")}
        return all((sites[site]["agent"] or {}).get("reachable") for site in HOSTS)

    wait_until(agents_reachable, "both lab agents reachable", 60.0)
    # Real guests: their own init writes the journal and answers on the agent channel.
    for vm in ("web01", "db01"):
        _writing(lab.vault, "hv01", vm)

    protected = job(lab, lab.call("POST", "/items", json={"vm": "web01", "to": "cloud",
                                                          "interval": "1h"}))  # fmt: skip
    first = step(protected, "initial-sync")["disks"]["d0"]
    assert first["source_digest"] == first["target_digest"]
    seq = _writing(lab.vault, "hv01", "web01")
    _writing(lab.vault, "hv01", "web01", past=seq + 5)
    report = lab.call("POST", "/items/web01/replicate", json={"app_consistent": True})
    point = report["point"]
    assert report["disks"]["d0"]["mode"] == "tracked", report
    assert point["type"] == "app-consistent" and point["workload_seq"] > seq, point
    checked = lab.call("GET", "/vms/web01/check", params={"point": point["id"]})
    assert checked["consistent"] and checked["last_seq"] >= point["workload_seq"], checked


def test_lab_down_stops_the_hosts_and_lab_up_brings_them_back(lab: Daemon) -> None:
    down = lab.call("POST", "/lab/down")
    assert sorted(down["hosts_stopped"]) == sorted(HOSTS.values()), down
    assert down["failed"] == [], down
    for name in HOSTS.values():
        host = _lab_host(lab.vault, name)
        assert host.running() is None and host.qemu_pids() == [], name

    up = lab.call("POST", "/lab/up", json={"provider": "libvirt"})
    assert {h["name"] for h in up["hosts"]} >= set(HOSTS.values())
    for name in HOSTS.values():
        assert _lab_host(lab.vault, name).running() is not None, name
    # The domains were kept defined and the network came back with its host.
    _writing(lab.vault, "hv01", "web01")
    # A clean stop kept the guest's checkpoint: the first pass after is a tracked one.
    report = lab.call("POST", "/items/web01/replicate", json={})
    assert report["disks"]["d0"]["mode"] == "tracked", report
    checked = lab.call("GET", "/vms/web01/check", params={"point": report["point"]["id"]})
    assert checked["consistent"] and checked["last_seq"] >= 1, checked


def test_a_libvirt_lab_refuses_to_become_a_local_one(lab: Daemon) -> None:
    before = lab.call("GET", "/hosts")
    status, body = lab.error("POST", "/lab/up", json={"provider": "local"})
    assert status == 400 and body["code"] == "INVALID_INPUT", body
    assert "is a kvm host already" in body["message"], body
    assert "lab up --provider libvirt" in body["message"], body
    status, body = lab.error("POST", "/lab/up", json={"provider": "xen"})
    assert status == 400 and body["code"] == "INVALID_INPUT", body
    assert lab.call("GET", "/hosts") == before
