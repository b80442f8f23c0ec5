"""Each site a host of its own (network namespaces, tests/netns/lab.py): the
engine in sr-ctl, site onprem's agent in sr-prim, site cloud's agent in sr-rec,
one bridged wan between them. A link is cut for real (its bridge port down),
rate-limited (tc tbf), captured on the wire (AF_PACKET), an agent killed.

Durations are printed (``-s`` shows them), never asserted.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.netns import capture
from tests.netns.conftest import Sites
from tests.netns.lab import Engine, NsAgent, helper, proc_io

pytestmark = [pytest.mark.netns, pytest.mark.timeout(900)]

MiB = 1 << 20
VM = "app01"
RECORD_MAGIC = b"SRWKLDRC"
SUPERBLOCK_MAGIC = b"SRWKLDSB"
CONTROL_PORT = 9999


# -- helpers ---------------------------------------------------------------------------


def create_vm(engine: Engine, onprem: NsAgent) -> dict[str, Any]:
    vm = {"name": VM, "host": "onprem-hv", "disks": [64 * MiB]}
    created: dict[str, Any] = engine.call("POST", "/vms", json=vm)
    assert created["site"] == "onprem" and created["power"] == "running", created
    assert disk_file(onprem).exists()
    return created


def disk_file(onprem: NsAgent) -> Path:
    return onprem.dir / "site" / "vms" / VM / "disks" / "d0.qcow2"


def chain_dir(cloud: NsAgent) -> Path:
    return cloud.dir / "site" / "replicas" / VM / "d0"


def chain(cloud: NsAgent) -> list[str]:
    return sorted(p.name for p in chain_dir(cloud).iterdir())


def protect(engine: Engine) -> dict[str, Any]:
    """Protect the VM to cloud (every point with its integrity proof, no scheduled
    pass during the test); the finished job."""
    body = {"vm": VM, "to": "cloud", "interval": "1h", "verify_points": True}
    job = engine.wait_job(engine.call("POST", "/items", json=body)["job"])
    assert job["state"] == "succeeded", job.get("error", {}).get("message")
    sync = next(s for s in job["steps"] if s["name"] == "initial-sync")["detail"]
    disk = sync["disks"]["d0"]
    assert disk["mode"] == "full" and disk["bytes_written"] > 0, disk
    assert_proof(disk)
    return job


def assert_proof(disk: dict[str, Any]) -> None:
    """The integrity proof of one disk of a pass: both digests there, and equal."""
    assert disk.get("source_digest") and disk.get("target_digest"), disk
    assert disk["source_digest"] == disk["target_digest"], disk


def replicate(engine: Engine) -> dict[str, Any]:
    seconds, response = engine.timed("POST", f"/items/{VM}/replicate")
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    disk = report["disks"]["d0"]
    print(f"pass {report['point']['id']}: {disk['mode']}, {disk['bytes_written']} B written, "
          f"{seconds:.2f} s")  # fmt: skip
    assert_proof(disk)
    return report


def pass_in_background(engine: Engine) -> tuple[threading.Thread, dict[str, Any]]:
    """``POST /items/VM/replicate`` in a started thread, on a client of its own;
    the dict gets its ``seconds``, ``response`` and when it ``ended``."""
    outcome: dict[str, Any] = {}

    def run_pass() -> None:
        client = engine.new_client()
        try:
            outcome["seconds"], outcome["response"] = engine.timed(
                "POST", f"/items/{VM}/replicate", client=client
            )
            outcome["ended"] = time.monotonic()
        finally:
            client.close()

    passing = threading.Thread(target=run_pass)
    passing.start()
    return passing, outcome


def points(engine: Engine) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = engine.call("GET", f"/items/{VM}/points")
    return found


def site(engine: Engine, name: str) -> tuple[float, dict[str, Any]]:
    """``GET /sites``: how long it took, and site ``name``'s entry."""
    seconds, response = engine.timed("GET", "/sites")
    assert response.status_code == 200, response.text
    return seconds, next(s for s in response.json() if s["name"] == name)


def site_until(engine: Engine, name: str, reachable: bool) -> dict[str, Any]:
    """Site ``name``'s entry of ``GET /sites`` once it says ``reachable`` (the
    daemon may answer from a cache its probes refresh: poll, bounded); prints
    how long each call and the whole wait took."""
    started, calls, slowest = time.monotonic(), 0, 0.0
    while True:
        seconds, entry = site(engine, name)
        calls, slowest = calls + 1, max(slowest, seconds)
        if entry["agent"]["reachable"] is reachable:
            break
        assert time.monotonic() - started < 90, f"{name} never became reachable={reachable}"
        time.sleep(0.5)
    print(f"GET /sites: {name} reachable={reachable} after {time.monotonic() - started:.2f} s, "
          f"{calls} call(s), the slowest {slowest:.2f} s: {entry['agent']}")  # fmt: skip
    return entry


def wait_for(what: str, condition: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def workload_id(image: bytes) -> bytes:
    """The workload id of the superblock found in a (qcow2) disk file's bytes."""
    at = image.find(SUPERBLOCK_MAGIC)
    assert at >= 0, "no workload superblock in the disk"
    return image[at + 24 : at + 40]


# -- 1. joined through namespace addresses, a VM protected and replicated ---------------


def test_join_protect_replicate_across_hosts(sites: Sites) -> None:
    engine, onprem, cloud = sites.engine, sites.onprem, sites.cloud
    listed = {s["name"]: s for s in engine.call("GET", "/sites")}
    for agent in (onprem, cloud):
        info = listed[agent.site]["agent"]
        assert info["reachable"] is True and info["url"] == agent.url, info
        assert agent.url.startswith("https://198.51.100.")

    create_vm(engine, onprem)
    engine_before, agent_before = proc_io(engine.pid), proc_io(onprem.pid)
    job = protect(engine)
    assert chain(cloud) == ["p000001.qcow2"]

    report = replicate(engine)
    second = report["disks"]["d0"]
    assert second["mode"] == "tracked" and second["tracking"] == "bitmap", second
    sync = next(s for s in job["steps"] if s["name"] == "initial-sync")["detail"]["disks"]["d0"]
    moved = sync["source_bytes_read"] + second["source_bytes_read"]
    engine_read = proc_io(engine.pid)["rchar"] - engine_before["rchar"]
    # The onprem agent read its disk through NBD (not counted in rchar) and
    # wrote it to the wire as TLS records (wchar); the engine read little.
    agent_sent = proc_io(onprem.pid)["wchar"] - agent_before["wchar"]
    print(f"moved {moved} B; onprem agent wrote {agent_sent} B, engine read {engine_read} B")
    assert moved > MiB and agent_sent >= moved, (agent_sent, moved)
    assert engine_read < moved / 4, (engine_read, moved)

    found = points(engine)
    assert [p["id"] for p in found] == [f"{VM}-000001", f"{VM}-000002"]
    assert found[-1]["id"] == report["point"]["id"] and found[-1]["site"] == "cloud"
    assert found[-1]["source_digests"]["d0"] == second["source_digest"]
    assert chain(cloud) == ["p000001.qcow2", "p000002.qcow2"]
    # Each agent wrote nothing in its working directory, HOME or TMPDIR.
    for agent in (onprem, cloud):
        for empty in (agent.cwd, agent.home, agent.tmp):
            assert list(empty.iterdir()) == [], (agent.site, empty)


# -- 2. a cut link: unreachable, then reachable again ----------------------------------


def test_cut_link_reports_unreachable_then_recovers(sites: Sites) -> None:
    lab, engine, onprem = sites.lab, sites.engine, sites.onprem
    create_vm(engine, onprem)
    protect(engine)
    before = points(engine)

    lab.cut("prim")
    onprem_site = site_until(engine, "onprem", reachable=False)
    assert onprem_site["agent"]["error"] == "AGENT_UNREACHABLE", onprem_site
    seconds, cloud_site = site(engine, "cloud")
    print(f"GET /sites again (cut): {seconds:.2f} s")
    assert cloud_site["agent"]["reachable"] is True, cloud_site

    seconds, refused = engine.timed("POST", f"/items/{VM}/replicate")
    print(f"replicate with the link cut: {seconds:.2f} s -> {refused.status_code} {refused.text}")
    assert refused.status_code >= 400, refused.text
    assert refused.json()["error"]["code"] == "AGENT_UNREACHABLE", refused.text
    assert points(engine) == before

    lab.restore("prim")
    onprem_site = site_until(engine, "onprem", reachable=True)
    assert onprem_site["agent"]["error"] is None, onprem_site

    report = replicate(engine)
    after = points(engine)
    assert [p["id"] for p in after] == [p["id"] for p in before] + [report["point"]["id"]]
    assert after[-1]["source_digests"]["d0"] == report["disks"]["d0"]["target_digest"]
    item = engine.call("GET", f"/items/{VM}")
    assert item["last_error"] is None, item


# -- 3. the bytes between agents are encrypted -----------------------------------------


def test_the_wire_between_agents_is_encrypted(sites: Sites, tmp_path: Path) -> None:
    lab, engine, onprem, cloud = sites.lab, sites.engine, sites.onprem, sites.cloud
    create_vm(engine, onprem)
    protect(engine)
    time.sleep(3)  # the guest's workload writes records (and their data) meanwhile
    image = disk_file(onprem).read_bytes()
    wid = workload_id(image)
    assert image.count(RECORD_MAGIC) > 10 and image.count(wid) > 10
    # A control message in the clear, in two segments: the capture and the
    # reassembly would see the patterns had the agents sent them in the clear.
    control = b"netns-control:" + RECORD_MAGIC + wid + b":end"
    parts = (control[:18], control[18:])
    ready = tmp_path / "sink.ready"
    rec_addr = lab.hosts["rec"].addr
    sink = lab.spawn("rec", helper("sink", rec_addr, str(CONTROL_PORT), str(ready)),
                     log=tmp_path / "sink.out", cwd=tmp_path, env=cloud.env)  # fmt: skip
    wait_for("the control sink", ready.exists, timeout=30)

    lab.rate("prim", 2 * MiB)
    with lab.capture("prim", tmp_path / "prim.cap") as cap:
        send = helper("send", rec_addr, str(CONTROL_PORT), *(p.hex() for p in parts))
        sent = lab.run("prim", send, cwd=tmp_path, env=onprem.env)
        assert sent.returncode == 0, sent.stderr
        report = replicate(engine)
    sink.wait(timeout=30)
    disk = report["disks"]["d0"]
    print(f"capture: {capture.summary(cap)}; pass sent {disk['bytes_written']} B")
    assert disk["bytes_written"] > MiB, disk

    streams = capture.tcp_streams(cap)
    prim, rec = lab.hosts["prim"].addr, lab.hosts["rec"].addr
    controls = [s for s in streams if s.dport == CONTROL_PORT]
    assert len(controls) == 1 and control in controls[0].data, controls
    assert controls[0].segments >= 2
    assert not any(control in f for _t, _k, f in capture.frames(cap))  # split across frames
    wire = [s for s in streams if {s.src, s.dst} == {prim, rec} and CONTROL_PORT not in
            (s.sport, s.dport)]  # fmt: skip
    wire_bytes = sum(len(s.data) for s in wire if s.src == prim)
    print(f"{len(streams)} TCP directions; onprem -> cloud payload {wire_bytes} B "
          f"in {sum(s.segments for s in wire if s.src == prim)} segments, "
          f"{sum(s.missing for s in streams)} B never seen")  # fmt: skip
    assert wire_bytes >= disk["bytes_written"], (wire_bytes, disk["bytes_written"])
    for stream in streams:
        if stream is controls[0]:
            continue
        assert RECORD_MAGIC not in stream.data, stream
        assert wid not in stream.data, stream
    # ... while the plaintext did cross: the new point holds the guest's records.
    point = report["point"]["files"]["d0"]
    received = (chain_dir(cloud) / point).read_bytes()
    assert received.count(RECORD_MAGIC) > 0 and wid in received


# -- 4. the target agent killed in the middle of a pass --------------------------------


def test_target_agent_killed_mid_pass(sites: Sites) -> None:
    lab, engine, onprem, cloud = sites.lab, sites.engine, sites.onprem, sites.cloud
    create_vm(engine, onprem)
    protect(engine)
    before = points(engine)
    assert chain(cloud) == ["p000001.qcow2"]
    time.sleep(3)  # enough guest writes for a pass of several seconds at 1 MiB/s
    lab.rate("prim", MiB)

    passing, outcome = pass_in_background(engine)
    partial = chain_dir(cloud) / "p000002.qcow2.partial"
    wait_for("the pass's partial point at cloud", partial.exists)
    time.sleep(1.0)
    assert passing.is_alive(), outcome  # the pass is still under way
    cloud.kill()
    killed = time.monotonic()
    passing.join(timeout=600)
    assert not passing.is_alive()
    response = outcome["response"]
    print(f"the pass, its target killed: {outcome['seconds']:.2f} s in all, "
          f"{outcome['ended'] - killed:.2f} s after the kill -> "
          f"{response.status_code} {response.text}")  # fmt: skip
    assert response.status_code >= 400, response.text
    error = response.json()["error"]
    # The error that ended the pass: the target (cloud's wire port) is gone.
    assert error["code"] == "WIRE_ERROR", error
    assert cloud.host.addr in error["message"] and "Connection refused" in error["message"]
    assert points(engine) == before
    item = engine.call("GET", f"/items/{VM}")
    assert item["last_error"], item
    print(f"item after the failed pass: state {item['state']}, last_error {item['last_error']}")

    lab.unrate("prim")
    cloud.start()  # same directory, same address and port
    report = replicate(engine)
    after = points(engine)
    assert [p["id"] for p in after] == [p["id"] for p in before] + [report["point"]["id"]]
    assert report["point"]["seq"] == before[-1]["seq"] + 1
    files = sorted(p["files"]["d0"] for p in after)
    assert chain(cloud) == files, (chain(cloud), files)  # no partial point left
    assert engine.call("GET", f"/items/{VM}")["last_error"] is None


# -- 5. the disaster: onprem gone, an unplanned failover to cloud ----------------------


def test_unplanned_failover_when_onprem_is_lost(sites: Sites) -> None:
    lab, engine, onprem = sites.lab, sites.engine, sites.onprem
    create_vm(engine, onprem)
    protect(engine)
    replicate(engine)

    lab.cut("prim")
    onprem.kill()
    seconds, response = engine.timed(
        "POST", f"/items/{VM}/failover", json={"type": "unplanned", "point": "latest"}
    )
    print(f"POST failover (unplanned): {seconds:.2f} s -> {response.status_code} {response.text}")
    assert response.status_code == 202, response.text
    started = time.monotonic()
    job = engine.wait_job(response.json()["job"])
    print(f"failover job: {time.monotonic() - started:.2f} s, {job['state']}")
    assert job["state"] == "succeeded", job
    steps = {s["name"]: s for s in job["steps"]}
    stop = steps["stop-source"]
    print(f"stop-source: {stop}")
    assert stop["state"] != "failed", stop
    detail = stop["detail"]
    assert detail.get("stopped") is None or "skipped" in detail, detail
    assert "unreachable" in str(detail).lower(), detail

    at_cloud = engine.call("GET", "/vms", params={"site": "cloud"})
    assert [(v["name"], v["power"]) for v in at_cloud] == [(VM, "running")], at_cloud
    item = engine.call("GET", f"/items/{VM}")
    print(f"item after the failover: {item['state']}, active {item['active_site']}")
    assert item["active_site"] == "cloud" and item["standby_site"] == "onprem", item
    check = engine.call("GET", f"/vms/{VM}/check", params={"site": "cloud"})
    print(f"vm check at cloud: {check}")
    assert check["consistent"] is True, check
    assert check["errors"] == [] and check["records_checked"] > 0, check
    assert check["site"] == "cloud", check
    # The whole inventory, as `vm list` and the portal show it, with onprem lost.
    seconds, listing = engine.timed("GET", "/vms")
    print(f"GET /vms with onprem lost: {seconds:.2f} s -> {listing.status_code}")
    assert listing.status_code == 200, listing.text
    running = [v for v in listing.json() if v["name"] == VM and v["site"] == "cloud"]
    assert len(running) == 1 and running[0]["power"] == "running", listing.text


# -- 6. the link cut under a pass: the pass ends, the failover goes through ------------


def test_link_cut_under_a_pass_ends_it_and_lets_the_failover_through(sites: Sites) -> None:
    """The primary's link is cut while a pass reads from it: the engine hears no
    heartbeat from onprem's agent, so the pass ends with AGENT_UNREACHABLE (the
    silence bound of agent/client.py, not a TCP timeout), records no point, and
    an unplanned failover asked for meanwhile succeeds at cloud."""
    lab, engine, onprem, cloud = sites.lab, sites.engine, sites.onprem, sites.cloud
    create_vm(engine, onprem)
    protect(engine)
    before = points(engine)
    time.sleep(3)  # guest writes, for a pass of several seconds at 1 MiB/s
    lab.rate("prim", MiB)

    passing, outcome = pass_in_background(engine)
    partial = chain_dir(cloud) / "p000002.qcow2.partial"
    wait_for("the pass's partial point at cloud", partial.exists)
    time.sleep(1.0)
    assert passing.is_alive(), outcome
    lab.cut("prim")
    cut = time.monotonic()
    seconds, response = engine.timed(
        "POST", f"/items/{VM}/failover", json={"type": "unplanned", "point": "latest"}
    )
    print(f"POST failover under the stalled pass: {seconds:.2f} s -> {response.status_code}")
    assert response.status_code == 202, response.text
    passing.join(timeout=300)
    assert not passing.is_alive()
    ended = outcome["response"]
    print(f"the pass, its source cut off: {outcome['ended'] - cut:.2f} s after the cut -> "
          f"{ended.status_code} {ended.text}")  # fmt: skip
    assert ended.status_code >= 400, ended.text
    assert ended.json()["error"]["code"] in ("AGENT_UNREACHABLE", "PASS_PREEMPTED"), ended.text
    job = engine.wait_job(response.json()["job"])
    print(f"failover job: {job['state']}, {time.monotonic() - cut:.2f} s after the cut")
    assert job["state"] == "succeeded", job
    assert "p000002.qcow2" not in chain(cloud)  # the cut pass sealed nothing
    assert job["vm"] == VM and before, before
    item = engine.call("GET", f"/items/{VM}")
    assert item["active_site"] == "cloud", item
    check = engine.call("GET", f"/vms/{VM}/check", params={"site": "cloud"})
    assert check["consistent"] is True and check["records_checked"] > 0, check
    lab.restore("prim")
    lab.unrate("prim")
