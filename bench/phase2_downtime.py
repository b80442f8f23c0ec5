"""Phase-2 downtime of a delta failback: the same change on a 1 GiB and a 16 GiB disk.

Runs the real thing: a daemon on a scratch vault, a VM per disk size (no guest
workload, so the change is exactly what this script writes), protect →
unplanned failover → commit, then for each run: failback phase 1, write the
same CHANGE bytes at the cloud site, complete, and read the job's phase-2
figures (predicted and measured bytes, downtime = source stopped → target
started); commit, reprotect and fail over again for the next run.

    .venv/bin/python bench/phase2_downtime.py [--runs 3] [--change-mib 64]

Prints a table with medians and the 16 GiB / 1 GiB downtime ratio (the cost
should follow the change, not the disk: a ratio near 1).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from siterecovery.disk.nbd import NbdDevice
from siterecovery.domain.model import Site, SiteRole
from siterecovery.providers.local.provider import LocalProvider

MiB = 1 << 20


class Daemon:
    def __init__(self, vault: Path) -> None:
        self.vault = vault
        argv = [sys.executable, "-m", "siterecovery", "serve", "--vault", str(vault), "--lab"]
        self.process = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        while not (vault / "daemon.json").exists():
            time.sleep(0.1)
        url = json.loads((vault / "daemon.json").read_text())["url"]
        token = (vault / "token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        self.http = httpx.Client(base_url=url + "/api/v1", headers=headers, timeout=600)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.http.request(method, path, json=body)
        response.raise_for_status()
        return response.json()

    def job(self, answer: dict[str, Any], until: str = "succeeded") -> dict[str, Any]:
        while True:
            job: dict[str, Any] = self.call("GET", f"/jobs/{answer['job']}/wait?timeout=30")
            if job["state"] in ("failed", "cancelled"):
                raise RuntimeError(json.dumps(job["error"]))
            if job["state"] == until:
                return job
            time.sleep(0.1)

    def stop(self) -> None:
        self.call("POST", "/lab/down")
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def write_change(vault: Path, vm: str, nbytes: int, run: int) -> None:
    """``nbytes`` of new random data, scattered in 1 MiB pieces over the disk."""
    cloud = Site("cloud", "local", str(vault / "sites" / "cloud"), SiteRole.CLOUD)
    socket = LocalProvider().run_dir(cloud, f"vm-{vm}") / "nbd.sock"
    with NbdDevice.connect(socket, "d0", writable=True) as disk:
        stride = disk.size // (nbytes // MiB) // MiB * MiB
        for index in range(nbytes // MiB):
            piece = memoryview(bytearray(os.urandom(MiB)))
            disk.write(index * stride + (run % 4) * MiB, piece)
        disk.flush()


def measure(daemon: Daemon, vm: str, change: int, runs: int) -> list[dict[str, Any]]:
    path = f"/items/{vm}"
    daemon.job(daemon.call("POST", "/items", {"vm": vm, "to": "cloud", "interval": "1h"}))
    results = []
    for run in range(runs):
        daemon.job(daemon.call("POST", f"{path}/failover", {"type": "unplanned"}))
        daemon.job(daemon.call("POST", f"{path}/commit", {}))
        started = daemon.call("POST", f"{path}/failover", {"type": "planned", "sync": "delta"})
        daemon.job(started, "awaiting-completion")
        write_change(daemon.vault, vm, change, run)
        daemon.call("POST", f"/jobs/{started['job']}/complete")
        done = daemon.job(started)
        results.append(done["result"]["phase2"] | {"equal": done["result"]["integrity"]["equal"]})
        daemon.job(daemon.call("POST", f"{path}/commit", {}))
        daemon.job(daemon.call("POST", f"{path}/reprotect", {}))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--change-mib", type=int, default=64)
    args = parser.parse_args()
    change = args.change_mib * MiB
    with tempfile.TemporaryDirectory(prefix="sr-bench-") as scratch:
        os.environ["SITERECOVERY_RUN_DIR"] = str(Path(scratch) / "run")
        vault = Path(scratch) / "vault"
        daemon = Daemon(vault)
        try:
            sizes = {"1 GiB": ("bench1g", "1G"), "16 GiB": ("bench16g", "16G")}
            table = {}
            for label, (vm, size) in sizes.items():
                body = {"name": vm, "host": "hv01", "disks": [size], "workload": False}
                daemon.call("POST", "/vms", body)
                table[label] = measure(daemon, vm, change, args.runs)
        finally:
            daemon.stop()
    print(f"phase-2 of a delta failback, {args.change_mib} MiB changed after phase 1, "
          f"median of {args.runs} runs")  # fmt: skip
    print(f"{'disk':>8} {'predicted MiB':>14} {'sent MiB':>9} {'sync s':>7} {'downtime s':>11}")
    medians = {}
    for label, runs in table.items():
        assert all(r["equal"] for r in runs), "integrity proof failed"
        row = {k: statistics.median(r[k] for r in runs) for k in
               ("predicted_bytes", "bytes", "seconds", "downtime_seconds")}  # fmt: skip
        medians[label] = row
        print(f"{label:>8} {row['predicted_bytes'] / MiB:>14.1f} {row['bytes'] / MiB:>9.1f} "
              f"{row['seconds']:>7.3f} {row['downtime_seconds']:>11.3f}")  # fmt: skip
    ratio = medians["16 GiB"]["downtime_seconds"] / medians["1 GiB"]["downtime_seconds"]
    print(f"downtime ratio 16 GiB / 1 GiB: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
