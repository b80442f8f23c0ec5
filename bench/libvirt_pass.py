"""libvirt passes: a pass costs what the guest changed, not what the disk holds.

``.venv/bin/python bench/libvirt_pass.py [--json FILE] [--runs 3]
[--change-mib 64] [--rate 120]`` (root: private libvirtd daemons in mount
and network namespaces, ``tests/libvirt/libvirtd.py``). The engine runs with
the lab; site onprem has kvm host ``kvm01`` and site cloud ``kvm02``, each a
private libvirtd. The guest is the lab guest (a real Linux under TCG here)
writing its journal on /dev/vda at ``--rate`` records/s.

1. For a 1 GiB and a 16 GiB disk (one VM each, protected to cloud), ``--runs``
   times: wait until the guest has acknowledged ``--change-mib`` MiB of
   records since the last point (the journal's own record sizes, from its
   superblock), then ``replicate``: the pass's seconds, bytes read at the
   source, bytes written at the target, and what the guest wrote in that
   time (data and journal slots). Medians; the 16 GiB / 1 GiB ratio.
2. A delta failback of the 1 GiB VM after an unplanned failover: phase 2's
   predicted and measured downtime.

One guest runs at a time (the other VM is stopped): two TCG guests on a
2-vCPU machine starve each other and the passes with them.

Page cache warm, the same machine for both sites (the two libvirtd instances
have separate storage). Everything started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Daemon, shut_down  # noqa: E402
from tests.libvirt.libvirtd import running_hosts  # noqa: E402
from tests.libvirt.support import connect, ensure_lab_network, wait_until  # noqa: E402

from siterecovery.domain.errors import GuestError  # noqa: E402
from siterecovery.domain.model import Site, SiteRole  # noqa: E402
from siterecovery.providers.libvirt.guest_image import build_guest, detect_accel  # noqa: E402
from siterecovery.providers.local import journal  # noqa: E402
from siterecovery.providers.local.replicas import LocalReplicaStore  # noqa: E402

MiB = 1 << 20


def _status(host: Any, name: str) -> dict[str, Any]:
    """The guest workload's ``sr-status``; seq 0 while its agent is not up yet."""
    try:
        with connect(host) as conn:
            found: dict[str, Any] = conn.domain(name).agent_command("sr-status", timeout=10)
            return found
    except GuestError:
        return {"seq": 0}


def _written(superblock: journal.Superblock, first: int, last: int) -> int:
    """Bytes the guest wrote for records first..last (data and journal slots)."""
    return sum(
        journal.plan_record(superblock, seq).length + journal.SLOT_SIZE
        for seq in range(first, last + 1)
    )


def _superblock(engine: Daemon, vm: str, point: dict[str, Any]) -> journal.Superblock:
    (site,) = [s for s in engine.call("GET", "/sites") if s["name"] == "cloud"]
    where = Site(name="cloud", provider="local", path=site["path"], role=SiteRole.CLOUD)
    with LocalReplicaStore().open_point(where, vm, "d0", point["files"]["d0"]) as device:
        found = journal.read_superblock(device)
    assert found is not None, "no journal on the point"
    return found


def _passes(engine: Daemon, host: Any, vm: str, size: str, args: argparse.Namespace) -> dict:
    body = {"name": vm, "host": "kvm01", "disks": [size], "switch": "sr-lab"}
    engine.call("POST", "/vms", json=body)
    wait_until(lambda: _status(host, vm)["seq"] >= 5, f"{vm} writing", 300.0)
    started = engine.call("POST", "/items", json={"vm": vm, "to": "cloud", "interval": "1h"})
    engine.wait_job(started["job"], timeout=600)
    point = engine.call("POST", f"/items/{vm}/replicate", json={"app_consistent": True})["point"]
    superblock = _superblock(engine, vm, point)
    runs = []
    for _ in range(args.runs):
        first = int(point["workload_seq"]) + 1

        def changed(first: int = first) -> bool:
            last = int(_status(host, vm)["seq"])
            return _written(superblock, first, last) >= args.change_mib * MiB

        wait_until(changed, f"{args.change_mib} MiB of guest writes", 900.0)
        report = engine.call("POST", f"/items/{vm}/replicate", json={"app_consistent": True})
        point, disk = report["point"], report["disks"]["d0"]
        runs.append({
            "seconds": disk["seconds"], "bytes_read": disk["bytes_read"],
            "bytes_written": disk["bytes_written"], "mode": disk["mode"],
            "guest_bytes": _written(superblock, first, int(point["workload_seq"])),
        })  # fmt: skip
    return {
        "size": size,
        "runs": runs,
        "seconds": statistics.median(r["seconds"] for r in runs),
        "read_per_guest_byte": statistics.median(r["bytes_read"] / r["guest_bytes"] for r in runs),
    }


def _failback(engine: Daemon, vm: str) -> dict[str, Any]:
    done = engine.wait_job(
        engine.call("POST", f"/items/{vm}/failover",
                    json={"type": "unplanned", "host": "kvm02"})["job"], timeout=600,
    )  # fmt: skip
    assert done["state"] == "succeeded", done
    engine.wait_job(engine.call("POST", f"/items/{vm}/commit", json={})["job"])
    time.sleep(5.0)  # the cloud guest writes
    started = engine.call(
        "POST", f"/items/{vm}/failover", json={"type": "planned", "sync": "delta"}
    )
    deadline = time.monotonic() + 600
    while engine.call("GET", f"/jobs/{started['job']}")["state"] != "awaiting-completion":
        assert time.monotonic() < deadline, "phase 1 did not end"
        time.sleep(0.5)
    time.sleep(5.0)  # writes after phase 1: what phase 2 sends
    engine.call("POST", f"/jobs/{started['job']}/complete")
    done = engine.wait_job(started["job"], timeout=600)
    assert done["state"] == "succeeded", done
    phase2 = done["result"]["phase2"]
    return {
        "predicted_seconds": phase2["predicted_seconds"],
        "measured_seconds": phase2["downtime_seconds"],
        "bytes": phase2["bytes"],
        "predicted_bytes": phase2["predicted_bytes"],
        "downtime": phase2.get("downtime"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--change-mib", type=int, default=64)
    parser.add_argument("--rate", type=float, default=120.0, help="guest records/s")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    image = build_guest()
    virt = "kvm" if detect_accel(image) == "kvm" else "qemu"
    with tempfile.TemporaryDirectory(prefix="sr-bench-lv-") as scratch:
        root = Path(scratch)
        with running_hosts(root / "hosts", ["east", "west"]) as hosts:
            for host in hosts:
                with connect(host) as conn:
                    ensure_lab_network(conn)
            engine = Daemon(root / "vault")
            env = {"SITERECOVERY_LIBVIRT_VIRT_TYPE": virt,
                   "SITERECOVERY_WORKLOAD_RATE": str(args.rate)}  # fmt: skip
            engine.start(lab=True, env=env)
            try:
                for site, name, host in (
                    ("onprem", "kvm01", hosts[0]),
                    ("cloud", "kvm02", hosts[1]),
                ):
                    engine.call(
                        "POST", "/hosts", json={"site": site, "name": name, "uri": host.uri}
                    )
                # One guest at a time: two TCG guests on two vCPUs starve each other.
                small = _passes(engine, hosts[0], "bench1g", "1G", args)
                engine.call("POST", "/vms/bench1g/stop", params={"site": "onprem"})
                large = _passes(engine, hosts[0], "bench16g", "16G", args)
                engine.call("POST", "/vms/bench16g/stop", params={"site": "onprem"})
                engine.call("POST", "/vms/bench1g/start", params={"site": "onprem"})
                wait_until(lambda: _status(hosts[0], "bench1g")["seq"] > 0, "bench1g back", 300.0)
                failback = _failback(engine, "bench1g")
            finally:
                for vm in engine.call("GET", "/vms"):
                    if vm["host"] in ("kvm01", "kvm02"):
                        assert engine.client is not None
                        engine.client.delete(f"/vms/{vm['name']}", params={"site": vm["site"]})
                shut_down(engine)
    result = {"accel": virt, "rate": args.rate, "change_mib": args.change_mib,
              "1g": small, "16g": large, "ratio": large["seconds"] / small["seconds"],
              "failback": failback}  # fmt: skip
    print(f"accelerator {virt}, guest {args.rate:g} records/s, {args.change_mib} MiB per pass")
    for label, case in (("1 GiB", small), ("16 GiB", large)):
        print(f"  {label}: pass {case['seconds']:.2f} s (median of {len(case['runs'])}), "
              f"bytes read / guest bytes {case['read_per_guest_byte']:.2f}")  # fmt: skip
        for run in case["runs"]:
            print(f"    {run}")
    print(f"  16 GiB / 1 GiB pass time: {result['ratio']:.2f}")
    print(f"  failback phase 2: {failback}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
