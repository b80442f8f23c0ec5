"""How long a replication group's common point pauses its members, by group size.

Runs the real thing: a daemon on a scratch vault with the lab, extra lab VMs
(each with its guest workload writing) up to the largest size, every VM
protected; then for each size a group of that many VMs takes RUNS common
points and the pause (first quiesce -> last thaw, as the engine reports it) is
recorded. This is the figure behind the group size limit (domain/recovery.py).

    .venv/bin/python bench/group_pause.py [--sizes 2,4,8] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.phase2_downtime import Daemon


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="2,4,8")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="sr-group-") as scratch:
        daemon = Daemon(Path(scratch) / "vault")
        try:
            vms = ["web01", "db01"] + [f"app{i:02d}" for i in range(max(sizes) - 2)]
            for vm in vms[2:]:
                daemon.call("POST", "/vms", {"name": vm, "host": "hv01", "disks": ["1G"]})
            for vm in vms:
                body = {"vm": vm, "to": "cloud", "interval": "1h"}
                daemon.job(daemon.call("POST", "/items", body))
            print(f"{'members':>8} {'median pause s':>15} {'per member ms':>14} {'max s':>7}")
            for size in sizes:
                name = f"g{size}"
                body = {"name": name, "vms": vms[:size], "common_interval": 0}
                daemon.call("POST", "/groups", body)
                pauses = [
                    daemon.call("POST", f"/groups/{name}/point")["paused_seconds"]
                    for _ in range(args.runs)
                ]
                daemon.call("DELETE", f"/groups/{name}")
                median = statistics.median(pauses)
                print(
                    f"{size:>8} {median:>15.4f} {1000 * median / size:>14.1f} {max(pauses):>7.3f}"
                )
        finally:
            daemon.call("POST", "/lab/down")
            daemon.stop()


if __name__ == "__main__":
    main()
