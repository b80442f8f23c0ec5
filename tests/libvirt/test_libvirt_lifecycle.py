"""A libvirt VM's whole life through the engine: two private libvirtd hosts,
``kvm01`` at site onprem and ``kvm02`` at site cloud, the lab guest (a real
Linux under TCG writing its journal on /dev/vda) as a domain on kvm01.

protect (full sync from a pull-mode backup) → a tracked pass (libvirt
checkpoints) → the point checked → unplanned failover: the domain defined on
kvm02 on an overlay of the point, started, its guest continuing the journal →
commit → planned failback with a delta (phase 1 while it runs, phase 2 after
its stop) into the stopped original on kvm01 → the original running again
with every record the cloud guest acknowledged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.providers.libvirt.guest_image import GuestImage, detect_accel

from ..conftest import Daemon
from ..failover.support import item, job, step
from .libvirtd import LibvirtHost
from .support import AGENT_TIMEOUT, connect, ensure_lab_network, wait_until

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def engine(
    two_libvirt_hosts: list[LibvirtHost],
    guest_image: GuestImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Daemon]:
    """The engine with the lab's two sites, and a kvm host at each."""
    for host in two_libvirt_hosts:
        with connect(host) as conn:
            ensure_lab_network(conn)
    virt_type = "kvm" if detect_accel(guest_image) == "kvm" else "qemu"
    daemon = Daemon(tmp_path_factory.mktemp("lifecycle") / "vault")
    daemon.start(lab=True, env={"SITERECOVERY_LIBVIRT_VIRT_TYPE": virt_type})
    try:
        east, west = two_libvirt_hosts
        for site, name, host in (("onprem", "kvm01", east), ("cloud", "kvm02", west)):
            daemon.call("POST", "/hosts", json={"site": site, "name": name, "uri": host.uri})
        yield daemon
    finally:
        for vm in daemon.call("GET", "/vms"):
            if vm["host"] in ("kvm01", "kvm02"):
                daemon.client.delete(f"/vms/{vm['name']}", params={"site": vm["site"]})
        daemon.stop()


def _status(host: LibvirtHost, name: str) -> dict[str, Any] | None:
    """The guest workload's ``sr-status`` (seq, paused) through libvirt; None
    while the domain or its agent is not there."""
    from siterecovery.domain.errors import GuestError, HypervisorError, VmNotFound

    try:
        with connect(host) as conn:
            found: dict[str, Any] = conn.domain(name).agent_command("sr-status", timeout=5)
    except (GuestError, HypervisorError, VmNotFound):
        return None
    return found


def _seq_at_least(host: LibvirtHost, name: str, seq: int) -> int:
    def reached() -> int | None:
        status = _status(host, name)
        return int(status["seq"]) if status and int(status["seq"]) >= seq else None

    found: int = wait_until(reached, f"{name} at seq {seq} on {host.name}", AGENT_TIMEOUT)
    return found


def _domain_state(host: LibvirtHost, name: str) -> str:
    with connect(host) as conn:
        state: str = conn.domain(name).state()
        return state


def test_a_libvirt_vm_is_protected_failed_over_and_failed_back(
    engine: Daemon, two_libvirt_hosts: list[LibvirtHost], tmp_path: Path
) -> None:
    east, west = two_libvirt_hosts
    timings: dict[str, float] = {}
    engine.call(
        "POST", "/vms",
        json={"name": "app01", "host": "kvm01", "disks": ["64M"], "switch": "sr-lab"},
    )  # fmt: skip
    assert _domain_state(east, "app01") == "running"
    _seq_at_least(east, "app01", 5)

    began = time.monotonic()
    protected = job(
        engine, engine.call("POST", "/items", json={"vm": "app01", "to": "cloud", "interval": "1h"})
    )
    timings["protect"] = time.monotonic() - began
    first = step(protected, "initial-sync")["disks"]["d0"]
    assert first["source_digest"] == first["target_digest"]

    _seq_at_least(east, "app01", (_status(east, "app01") or {"seq": 0})["seq"] + 10)
    report = engine.call("POST", "/items/app01/replicate", json={"app_consistent": True})
    point = report["point"]
    assert report["disks"]["d0"]["mode"] == "tracked", report  # libvirt's checkpoint
    assert point["type"] == "app-consistent" and point["workload_seq"] >= 15
    assert report["disks"]["d0"]["bytes_read"] < 32 << 20  # the change, not the 64 MiB disk
    checked = engine.call("GET", "/vms/app01/check", params={"point": point["id"]})
    assert checked["consistent"] and checked["last_seq"] >= point["workload_seq"], checked

    began = time.monotonic()
    done = job(engine, engine.call("POST", "/items/app01/failover",
                                   json={"type": "unplanned", "host": "kvm02"}))  # fmt: skip
    timings["failover"] = time.monotonic() - began
    assert item(engine, "app01")["state"] == "failed-over"
    assert _domain_state(west, "app01") == "running"
    assert _domain_state(east, "app01") == "shutoff"
    # The cloud guest goes on from the point's journal.
    _seq_at_least(west, "app01", point["workload_seq"] + 10)
    job(engine, engine.call("POST", "/items/app01/commit", json={}))

    began = time.monotonic()
    started = engine.call(
        "POST", "/items/app01/failover", json={"type": "planned", "sync": "delta"}
    )
    waiting = job(engine, started, "awaiting-completion")
    phase1 = step(waiting, "phase1-sync")
    assert phase1["disks"]["d0"]["mode"] == "tracked", phase1
    _seq_at_least(west, "app01", (_status(west, "app01") or {"seq": 0})["seq"] + 10)
    engine.call("POST", f"/jobs/{started['job']}/complete")
    done = job(engine, started)
    timings["failback"] = time.monotonic() - began
    last = step(done, "stop-source")["acknowledged_seq"]
    assert done["result"]["integrity"]["equal"] is True, done["result"]
    assert _domain_state(east, "app01") == "running"
    assert _domain_state(west, "app01") == "shutoff"
    # Zero loss: every record the cloud guest acknowledged is on-premises.
    assert _seq_at_least(east, "app01", last + 1) > last
    live = engine.call("GET", "/vms/app01/check", params={"site": "onprem"})
    assert live["consistent"] and live["last_seq"] >= last, live
    job(engine, engine.call("POST", "/items/app01/commit", json={}))
    print(
        "\n"
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        + f"; point seq {point['workload_seq']}, failback last seq {last}"
    )
