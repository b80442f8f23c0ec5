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

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from siterecovery.providers.libvirt.domains import DiskSpec, NicSpec, domain_xml, parse_domain
from siterecovery.providers.libvirt.guest_image import GuestImage, detect_accel

from ..conftest import Daemon, shut_down
from ..failover.support import item, job, step
from .libvirtd import LibvirtHost, running_hosts
from .support import AGENT_TIMEOUT, connect, ensure_lab_network, lab_domain, wait_until

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
    with connect(two_libvirt_hosts[1]) as conn:  # the drills' isolated network
        conn.define_network("<network><name>sr-drill</name><bridge name='srdrill0'/></network>")
    virt_type = "kvm" if detect_accel(guest_image) == "kvm" else "qemu"
    daemon = Daemon(tmp_path_factory.mktemp("lifecycle") / "vault")
    daemon.start(lab=True, env={"SITERECOVERY_LIBVIRT_VIRT_TYPE": virt_type})
    try:
        east, west = two_libvirt_hosts
        for site, name, host in (("onprem", "kvm01", east), ("cloud", "kvm02", west)):
            daemon.call("POST", "/hosts", json={"site": site, "name": name, "uri": host.uri})
        yield daemon
    finally:
        try:
            for vm in daemon.call("GET", "/vms"):
                if vm["host"] in ("kvm01", "kvm02", "kvm03"):
                    daemon.client.delete(f"/vms/{vm['name']}", params={"site": vm["site"]})
        finally:
            shut_down(daemon)


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


def test_a_domain_its_owner_defined_is_adopted_protected_and_comes_back_home(
    engine: Daemon, two_libvirt_hosts: list[LibvirtHost], guest_image: GuestImage, tmp_path: Path
) -> None:
    """`protect` of a domain siterecovery did not create: it is taken in with
    its disk where its owner put it and its hardware (an e1000 NIC), fails over
    to the other host with the same hardware, and fails back into that very
    disk file."""
    east, west = two_libvirt_hosts
    spec = lab_domain(east, guest_image, "erp02", seed=11)
    spec = replace(spec, nics=(NicSpec("52:54:00:5e:00:22", "sr-lab", "e1000"),))
    owner_disk = spec.disks[0].path
    (tmp_path / "erp02.xml").write_text(domain_xml(spec))
    east.virsh("define", str(tmp_path / "erp02.xml"))
    east.virsh("start", "erp02")
    _seq_at_least(east, "erp02", 5)
    listed = {v["name"]: v for v in engine.call("GET", "/vms", params={"host": "kvm01"})}
    assert listed["erp02"]["managed"] is False

    job(
        engine, engine.call("POST", "/items", json={"vm": "erp02", "to": "cloud", "interval": "1h"})
    )
    adopted = engine.call("GET", "/vms/erp02", params={"site": "onprem"})
    assert (adopted["nic_models"], adopted["nics"]) == (["e1000"], ["sr-lab"])
    assert adopted["disks"] == [{"name": "d0", "size": 64 << 20, "bus": "virtio"}]
    assert adopted["workload"] is True  # it boots the lab guest
    point = engine.call("POST", "/items/erp02/replicate", json={"app_consistent": True})["point"]

    job(engine, engine.call("POST", "/items/erp02/failover",
                            json={"type": "unplanned", "host": "kvm02"}))  # fmt: skip
    with connect(west) as conn:
        copy = parse_domain(conn.domain("erp02").xml())
    assert [n.model for n in copy.nics] == ["e1000"] and copy.disks[0].bus == "virtio"
    assert copy.disks[0].path != owner_disk  # an overlay of the point at the cloud site
    _seq_at_least(west, "erp02", point["workload_seq"] + 10)
    job(engine, engine.call("POST", "/items/erp02/commit", json={}))

    failback = {"type": "planned", "sync": "delta"}
    started = engine.call("POST", "/items/erp02/failover", json=failback)
    job(engine, started, "awaiting-completion")
    engine.call("POST", f"/jobs/{started['job']}/complete")
    done = job(engine, started)
    last = step(done, "stop-source")["acknowledged_seq"]
    assert done["result"]["integrity"]["equal"] is True
    with connect(east) as conn:
        home = parse_domain(conn.domain("erp02").xml())
    assert home.disks[0].path == owner_disk  # back in its owner's file
    assert _seq_at_least(east, "erp02", last + 1) > last
    live = engine.call("GET", "/vms/erp02/check", params={"site": "onprem"})
    assert live["consistent"] and live["last_seq"] >= last, live


def test_a_domain_on_a_raw_disk_is_refused_and_nothing_is_recorded(
    engine: Daemon, two_libvirt_hosts: list[LibvirtHost], guest_image: GuestImage, tmp_path: Path
) -> None:
    east = two_libvirt_hosts[0]
    raw = tmp_path / "raw01.img"
    raw.write_bytes(b"")
    os.truncate(raw, 64 << 20)
    spec = replace(
        lab_domain(east, guest_image, "raw01", seed=12),
        disks=(DiskSpec("vda", raw, "virtio", "raw"),),
    )
    (tmp_path / "raw01.xml").write_text(domain_xml(spec))
    east.virsh("define", str(tmp_path / "raw01.xml"))
    status, error = engine.error(
        "POST", "/items", json={"vm": "raw01", "to": "cloud", "interval": "1h"}
    )
    assert (status, error["code"]) == (400, "INVALID_INPUT"), error
    assert "qemu-img convert" in error["message"]
    assert "raw01" not in {v["name"] for v in engine.call("GET", "/vms")}
    assert "raw01" not in {i["vm"] for i in engine.call("GET", "/items")}


def test_a_crashed_domain_is_never_trusted_its_next_pass_is_a_checksum_pass(
    engine: Daemon, two_libvirt_hosts: list[LibvirtHost]
) -> None:
    """qemu SIGKILLed under a running domain (a host crash): its bitmaps may
    miss writes. After the restart the pass says why it cannot trust them and
    compares checksums instead; the pass after that is tracked again; every
    point is consistent."""
    east = two_libvirt_hosts[0]
    body = {"name": "app03", "host": "kvm01", "disks": ["64M"], "switch": "sr-lab"}
    engine.call("POST", "/vms", json=body)
    _seq_at_least(east, "app03", 5)
    protect = {"vm": "app03", "to": "cloud", "interval": "1h"}
    job(engine, engine.call("POST", "/items", json=protect))
    tracked = engine.call("POST", "/items/app03/replicate", json={"app_consistent": True})
    assert tracked["disks"]["d0"]["tracking"] == "bitmap", tracked

    with connect(east) as conn:
        pids = set(east.qemu_pids())
        conn.domain("app03")  # still there
    (pid,) = [p for p in pids if b"app03" in Path(f"/proc/{p}/cmdline").read_bytes()]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _domain_state(east, "app03") == "shutoff", "app03 crashed", 60.0)
    engine.call("POST", "/vms/app03/start", params={"site": "onprem"})
    _seq_at_least(east, "app03", 1)

    after_crash = engine.call("POST", "/items/app03/replicate", json={"app_consistent": True})
    disk = after_crash["disks"]["d0"]
    assert disk["tracking"] in ("inconsistent-bitmap", "no-bitmap"), disk
    assert disk["mode"] == "checksum", disk
    assert disk["bytes_written"] < 32 << 20  # only the blocks that differ
    again = engine.call("POST", "/items/app03/replicate", json={"app_consistent": True})
    assert (again["disks"]["d0"]["tracking"], again["disks"]["d0"]["mode"]) == (
        "bitmap", "tracked",
    )  # fmt: skip
    for point in engine.call("GET", "/items/app03/points"):
        checked = engine.call("GET", "/vms/app03/check", params={"point": point["id"]})
        assert checked["consistent"], (point, checked)


def test_a_domain_destroyed_mid_pass_fails_that_pass_and_loses_no_point(
    engine: Daemon, two_libvirt_hosts: list[LibvirtHost]
) -> None:
    """``virsh destroy`` while a pass reads the domain's pull-backup export
    (the pass slowed by the item's rate cap): that pass fails with an error
    and seals nothing, the points before it are untouched, and once the
    domain runs again its next pass seals a point that lost nothing (proved
    with the stopped domain's disk against its last point, block for block)."""
    east = two_libvirt_hosts[0]
    body = {"name": "app05", "host": "kvm01", "disks": ["64M"], "switch": "sr-lab"}
    engine.call("POST", "/vms", json=body)
    _seq_at_least(east, "app05", 5)
    protect = {"vm": "app05", "to": "cloud", "interval": "1h"}
    job(engine, engine.call("POST", "/items", json=protect))
    before = engine.call("GET", "/items/app05/points")
    engine.call("PATCH", "/items/app05", json={"max_rate": "64K"})
    _seq_at_least(east, "app05", (_status(east, "app05") or {"seq": 0})["seq"] + 40)

    answers: list[tuple[int, dict[str, Any]]] = []

    def replicate() -> None:
        answers.append(engine.error("POST", "/items/app05/replicate", json={}))

    passing = threading.Thread(target=replicate)

    def backup_running() -> bool:
        with connect(east) as conn:
            return conn.domain("app05").backup_xml() is not None

    passing.start()
    try:
        wait_until(backup_running, "the pass's backup job on app05", 120.0)
        east.virsh("destroy", "app05")
    finally:
        passing.join(300)
    assert not passing.is_alive(), "the pass did not end after its domain was destroyed"
    ((status, error),) = answers
    assert status >= 400 and error["code"] in ("DISK_ERROR", "HYPERVISOR_ERROR"), error
    assert engine.call("GET", "/items/app05/points") == before  # nothing sealed, nothing lost

    engine.call("PATCH", "/items/app05", json={"max_rate": 0})
    engine.call("POST", "/vms/app05/start", params={"site": "onprem"})
    _seq_at_least(east, "app05", 1)
    # virsh destroy is SIGTERM first: qemu stored its bitmaps as it ended, so
    # they may be trusted (tracked), or else the pass compares checksums; the
    # failed pass's new checkpoint was kept, the next pass reads the union.
    after = engine.call("POST", "/items/app05/replicate", json={"app_consistent": True})
    disk = after["disks"]["d0"]
    assert (disk["mode"], disk["tracking"]) in (
        ("tracked", "bitmap"), ("checksum", "inconsistent-bitmap"), ("checksum", "no-bitmap"),
    ), disk  # fmt: skip
    # Bytes: a pass of the stopped domain, tracked from that one, makes a point
    # equal to its disk block for block; a block the pass after the destroy
    # missed would differ.
    engine.call("POST", "/vms/app05/stop", params={"site": "onprem"})
    last = engine.call("POST", "/items/app05/replicate", json={})
    assert last["disks"]["d0"]["mode"] == "tracked", last
    verified = engine.call("GET", "/items/app05/verify")
    assert verified["equal"] is True, verified
    for point in engine.call("GET", "/items/app05/points"):
        checked = engine.call("GET", "/vms/app05/check", params={"point": point["id"]})
        assert checked["consistent"], (point, checked)


def test_a_two_disk_domain_replicates_both_disks_at_one_instant_and_fails_over(
    engine: Daemon, two_libvirt_hosts: list[LibvirtHost], tmp_path: Path
) -> None:
    """A domain with two disks (vda: the guest's journal; vdb: data written
    while it was stopped): one backup job covers both, each disk's point
    equals its source, and the failed-over domain has both disks, vdb's
    bytes those written."""
    east, west = two_libvirt_hosts
    body = {"name": "app06", "host": "kvm01", "disks": ["64M", "64M"], "switch": "sr-lab"}
    engine.call("POST", "/vms", json=body)
    engine.call("POST", "/vms/app06/stop", params={"site": "onprem"})
    data = tmp_path / "vdb.raw"
    data.write_bytes(os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(1 << 20))
    d1 = engine.vault / "sites" / "onprem" / "vms" / "app06" / "disks" / "d1.qcow2"
    _write_into(d1, data)
    engine.call("POST", "/vms/app06/start", params={"site": "onprem"})
    _seq_at_least(east, "app06", 5)

    protected = job(engine, engine.call("POST", "/items", json={"vm": "app06", "to": "cloud",
                                                               "interval": "1h"}))  # fmt: skip
    disks = step(protected, "initial-sync")["disks"]
    assert set(disks) == {"d0", "d1"}
    for name, disk in disks.items():
        assert disk["source_digest"] == disk["target_digest"], (name, disk)
    _seq_at_least(east, "app06", (_status(east, "app06") or {"seq": 0})["seq"] + 10)
    report = engine.call("POST", "/items/app06/replicate", json={"app_consistent": True})
    assert {d: r["mode"] for d, r in report["disks"].items()} == {"d0": "tracked", "d1": "tracked"}
    assert report["disks"]["d1"]["bytes_written"] == 0  # vdb did not change

    job(engine, engine.call("POST", "/items/app06/failover",
                            json={"type": "unplanned", "host": "kvm02"}))  # fmt: skip
    with connect(west) as conn:
        copy = parse_domain(conn.domain("app06").xml())
    assert [d.target for d in copy.disks] == ["vda", "vdb"], copy.disks
    _seq_at_least(west, "app06", report["point"]["workload_seq"] + 5)
    engine.call("POST", "/vms/app06/stop", params={"site": "cloud"})
    (vdb,) = [d.path for d in copy.disks if d.target == "vdb"]
    raw = tmp_path / "vdb-cloud.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(vdb), str(raw)],
                   check=True)  # fmt: skip
    assert raw.read_bytes()[: data.stat().st_size] == data.read_bytes()
    job(engine, engine.call("POST", "/items/app06/commit", json={}))


def _write_into(image: Path, data: Path) -> None:
    """Write ``data`` at offset 0 of a stopped domain's qcow2 (qemu-io, as a user would)."""
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {data} 0 {data.stat().st_size}", str(image)],
        check=True, capture_output=True,
    )  # fmt: skip


def test_a_hyperv_disk_imports_to_a_libvirt_domain(
    engine: Daemon, two_libvirt_hosts: list[LibvirtHost], tmp_path: Path
) -> None:
    """`vm import --disk FILE.vhdx` on a kvm host: a domain defined on that
    host, shut off, whose disk reads exactly as the VHDX."""
    east = two_libvirt_hosts[0]
    raw = tmp_path / "hv.raw"
    raw.write_bytes(os.urandom(4 << 20) + bytes(60 << 20))
    vhdx = tmp_path / "hv.vhdx"
    subprocess.run(["qemu-img", "convert", "-O", "vhdx", str(raw), str(vhdx)], check=True)
    vm = engine.call(
        "POST", "/vms/import",
        json={"name": "hv01-imp", "host": "kvm01", "disks": [str(vhdx)], "switch": "sr-lab"},
    )  # fmt: skip
    assert (vm["host"], vm["power"], vm["disks"][0]["size"]) == ("kvm01", "stopped", 64 << 20)
    with connect(east) as conn:
        domain = conn.domain("hv01-imp")
        assert domain.state() == "shutoff"
        disk = parse_domain(domain.xml()).disks[0].path
    assert disk is not None
    converted = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(converted)], check=True)
    assert converted.read_bytes() == raw.read_bytes()


@pytest.fixture(scope="module")
def north(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtHost]:
    """A third private libvirtd: the alternate host at site onprem."""
    with running_hosts(tmp_path_factory.mktemp("lv3"), ["north"]) as (host,):
        with connect(host) as conn:
            ensure_lab_network(conn)
        yield host


def test_drill_change_point_and_a_full_failback_to_a_new_domain_on_another_host(
    engine: Daemon, two_libvirt_hosts: list[LibvirtHost], north: LibvirtHost
) -> None:
    """The rest of the lifecycle on libvirt: a drill on an isolated network while
    replication goes on, an unplanned failover to an older point changed to the
    latest before commit, and, the original VM lost, a full failback that
    defines a new domain on another host (--create-vm), then reprotect."""
    east, west = two_libvirt_hosts
    engine.call("POST", "/hosts", json={"site": "onprem", "name": "kvm03", "uri": north.uri})
    body = {"name": "app04", "host": "kvm01", "disks": ["64M"], "switch": "sr-lab"}
    engine.call("POST", "/vms", json=body)
    _seq_at_least(east, "app04", 5)
    protect = {"vm": "app04", "to": "cloud", "interval": "1h"}
    job(engine, engine.call("POST", "/items", json=protect))
    older = engine.call("POST", "/items/app04/replicate", json={"app_consistent": True})["point"]

    drill = job(engine, engine.call("POST", "/items/app04/failover",
                                    json={"type": "test", "switch": "sr-drill"}))  # fmt: skip
    assert drill["result"]["drill"]["vm"] == "app04-test"
    with connect(west) as conn:
        test_vm = parse_domain(conn.domain("app04-test").xml())
    assert [n.switch for n in test_vm.nics] == ["sr-drill"]
    _seq_at_least(west, "app04-test", older["workload_seq"] + 5)  # the drill's guest runs
    _seq_at_least(east, "app04", older["workload_seq"] + 10)
    latest = engine.call("POST", "/items/app04/replicate", json={"app_consistent": True})["point"]
    assert latest["seq"] > older["seq"]  # replication went on during the drill
    job(engine, engine.call("POST", "/items/app04/cleanup-test"))
    with connect(west) as conn:
        assert "app04-test" not in {d.name for d in conn.domains()}

    to_older = {"type": "unplanned", "point": older["id"], "host": "kvm02"}
    job(engine, engine.call("POST", "/items/app04/failover", json=to_older))
    assert _seq_at_least(west, "app04", older["workload_seq"] + 1) > older["workload_seq"]
    to_latest = {**to_older, "point": latest["id"]}
    changed = job(engine, engine.call("POST", "/items/app04/failover", json=to_latest))
    assert item(engine, "app04")["failover"]["point"] == latest["id"]
    assert step(changed, "remove-previous-failover")["deleted"] == "app04@cloud"
    _seq_at_least(west, "app04", latest["workload_seq"] + 5)
    job(engine, engine.call("POST", "/items/app04/commit", json={}))

    engine.call("DELETE", "/vms/app04", params={"site": "onprem"})  # the original is lost
    with connect(east) as conn:
        assert "app04" not in {d.name for d in conn.domains()}
    back = {"type": "planned", "sync": "full", "host": "kvm03", "create_vm": True}
    done = job(engine, engine.call("POST", "/items/app04/failover", json=back))
    assert step(done, "prepare-target")["created"] is True
    assert done["result"]["integrity"]["equal"] is True
    last = step(done, "stop-source")["acknowledged_seq"]
    assert _domain_state(north, "app04") == "running"
    assert _seq_at_least(north, "app04", last + 1) > last
    live = engine.call("GET", "/vms/app04/check", params={"site": "onprem"})
    assert live["consistent"] and live["last_seq"] >= last, live
    job(engine, engine.call("POST", "/items/app04/commit", json={}))
    with connect(west) as conn:
        assert "app04" not in {d.name for d in conn.domains()}  # commit undefined it
    reprotected = job(engine, engine.call("POST", "/items/app04/reprotect", json={}))
    assert item(engine, "app04")["state"] == "protected", reprotected
    report = engine.call("POST", "/items/app04/replicate", json={"app_consistent": True})
    assert report["disks"]["d0"]["tracking"] == "bitmap", report

    # A host that stops answering hides no other VM from the list.
    north.stop()
    listed = {(v["name"], v["site"]): v for v in engine.call("GET", "/vms")}
    lost = listed[("app04", "onprem")]
    assert (lost["power"], lost["unreachable"]["code"]) == ("unknown", "HYPERVISOR_ERROR")
    assert listed[("web01", "onprem")]["power"] == "running"  # a lab VM on a local host
