"""Site agents: two agents in two network namespaces against in-process sites.

``.venv/bin/python bench/agents.py [--quick] [--json FILE]`` (root: it makes
network namespaces; ``make bench-agents``). It reuses the netns suite's
harness (``tests/netns/lab.py``, imported, not copied) and runs two setups at
once, each in a lab of its own (four namespaces, a bridge, three veths):

- **agents**: the engine (``siterecovery serve``) in sr-ctl, site onprem's
  agent (``siterecovery agent serve``) in sr-prim, site cloud's in sr-rec, as
  ``tests/netns/conftest.py`` joins them; every byte of a pass goes agent to
  agent over the wire (TLS) across the lab's bridge;
- **in-process**: the engine alone in its lab's sr-ctl, with two local sites
  (``POST /sites`` with a path): both sites live in the engine's process, a
  pass copies NBD to NBD inside it, nothing crosses a link.

The API is reached, in both, through the harness' unix-socket forwarder.

Cases (each can be chosen with ``--only``):

1. ``pass`` — one VM per setup with a 1 GiB disk (quick: 256 MiB) and no
   guest workload (``workload: false``, so nothing but this script writes).
   The script fills the whole disk with random data through the VM's own
   NBD socket (its qemu-storage-daemon; a path-bound unix socket, reachable
   from here), then ``protect`` (the initial full sync, timed ``--runs``
   times: protect, disable, protect ...), then ``--runs`` passes, each after
   writing ``--change-mib`` (64) MiB of random data into distinct random
   64 KiB blocks through the same socket (the dirty bitmap sees exactly
   that). The same bytes at the same places in both setups, interleaved
   (in-process, agents, in-process, ...).
2. ``rpo`` — a VM with the lab's guest workload writing about ``--churn-mb``
   (10) MB/s (``SITERECOVERY_WORKLOAD_RATE`` records/s in the environment of
   the process that spawns it, a record being 4 to 64 KiB of data, 34 KiB on
   average, plus its 4 KiB journal slot), protected with ``--interval`` (10 s),
   ``GET /items/VM`` sampled every second for ``--minutes`` (3; quick 1):
   in-process, agents, and agents with a tbf of ``--rpo-link`` (50) MB/s on
   onprem's link.
3. ``wire`` — a 1 GiB random raw image (quick: 256 MiB), fully allocated,
   copied from the sr-prim namespace to the sr-rec namespace of the agents'
   lab: ``siterecovery sync SRC tcp://REC:PORT`` into ``sync-receive``
   (default options; ``--no-verify --no-flush``; ``--key`` with a vault key:
   the CLI has no TLS option, ``--key`` is its encryption) against
   ``nbdcopy SRC nbd://REC:PORT`` (with and without ``--flush``) and
   ``qemu-img convert -n`` into a ``qemu-nbd`` export in sr-rec; then the
   two plain ``sync`` runs and ``nbdcopy`` again with a tbf of
   ``--wire-link`` (100) MB/s on prim's link.

Method: medians of ``--runs`` (default 3) interleaved runs for cases 1 and 3,
one run of ``--minutes`` per setup for case 2. Sources are in the page cache
(just written, or read once before), targets are new files (page cache,
unless a contender flushes), ``sync(2)`` before every timed run. CPU
seconds are the user + system time of every process in a setup's
namespaces, sampled from ``/proc`` every 0.2 s while a timed operation runs
(a process that lives less than that is missed), or ``getrusage`` of the
children for case 3. MB = 10^6 bytes, MiB = 2^20.

Everything (namespaces, processes, the scratch directory unless ``--dir``
named it) is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.netns.lab import SITERECOVERY, Engine, Lab, LabError, NsAgent  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000
BLOCK = 64 * 1024
MEAN_RECORD = 4096 * 17 // 2
"""Mean data bytes of a workload record: 4096 * (1 + n), n uniform in 0..15."""
VM_PASS = "bench"
WIRE_PORT = 9100
NBD_PORT = 10809
SAMPLE_EVERY = 0.2


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# -- CPU time of the processes of a lab --------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _ns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def _label(pid: int) -> str:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    if comm.startswith("qemu-storage"):
        return "qsd"
    if b"agent\0serve" in cmdline:
        return "agent"
    if b"\0serve\0" in cmdline:
        return "engine"
    if b"workload" in cmdline:
        return "workload"
    if b"lab.py\0forward" in cmdline:
        return "forwarder"
    return comm


def _cpu_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (the process' own)


class CpuMeter:
    """User + system seconds of every process in ``lab``'s namespaces between
    :meth:`start` and :meth:`stop`, by ``HOST:LABEL`` (``prim:agent``, ...)."""

    def __init__(self, lab: Lab) -> None:
        self._spaces = {_ns_inode(h.ns): key for key, h in lab.hosts.items()}
        self._first: dict[int, int] = {}
        self._last: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> dict[int, tuple[str, int]]:
        found: dict[int, tuple[str, int]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                host = self._spaces.get(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:
                continue
            if host is None:
                continue
            ticks = _cpu_ticks(pid)
            if ticks is not None:
                known = self._last.get(pid)
                name = known[0] if known else f"{host}:{_label(pid)}"
                found[pid] = (name, ticks)
        return found

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self._last.update(self._sample())

    def start(self) -> CpuMeter:
        first = self._sample()
        self._first = {pid: ticks for pid, (_n, ticks) in first.items()}
        self._last = dict(first)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())
        used: dict[str, float] = {}
        for pid, (name, ticks) in self._last.items():
            delta = (ticks - self._first.get(pid, 0)) / _TICK
            if delta > 0:
                used[name] = round(used.get(name, 0.0) + delta, 2)
        return dict(sorted(used.items()))


@contextlib.contextmanager
def metered(lab: Lab, into: dict[str, Any]) -> Iterator[None]:
    meter = CpuMeter(lab).start()
    try:
        yield
    finally:
        into["cpu"] = meter.stop()


# -- the two setups ----------------------------------------------------------------------


@dataclass
class Setup:
    """One way of running the sites: its lab, its engine, where onprem keeps VMs."""

    name: str
    lab: Lab
    engine: Engine
    onprem_path: Path
    """The onprem site's directory (its ``vms/``)."""
    onprem_run: Path
    """SITERECOVERY_RUN_DIR of the process that runs onprem's VMs."""
    agents: dict[str, NsAgent] = field(default_factory=dict)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.engine.call(method, path, **kwargs)

    def create_vm(self, name: str, size: int, *, workload: bool) -> None:
        body = {"name": name, "host": "onprem-hv", "disks": [size], "workload": workload}
        created = self.call("POST", "/vms", json=body)
        assert created["power"] == "running", created

    def nbd_socket(self, vm: str) -> Path:
        """The running VM's qemu-storage-daemon NBD socket (LocalProvider.run_dir)."""
        key = f"{self.onprem_path.resolve()}|vm-{vm}"
        path = self.onprem_run / hashlib.sha1(key.encode()).hexdigest()[:16] / "nbd.sock"
        if not path.exists():
            raise LabError(f"no NBD socket for {vm} at {path}")
        return path

    def workload_state(self, vm: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(
            (self.onprem_path / "vms" / vm / "workload.json").read_text()
        )
        return state

    def protect(self, vm: str, interval: str | float) -> tuple[float, dict[str, Any]]:
        body = {"vm": vm, "to": "cloud", "interval": interval}
        started = time.monotonic()
        job = self.engine.wait_job(self.call("POST", "/items", json=body)["job"], timeout=900)
        wall = time.monotonic() - started
        if job["state"] != "succeeded":
            raise LabError(f"protect {vm} ({self.name}) {job['state']}: {job.get('error')}")
        return wall, job

    def replicate(self, vm: str) -> tuple[float, dict[str, Any]]:
        seconds, response = self.engine.timed("POST", f"/items/{vm}/replicate")
        if response.status_code != 200:
            raise LabError(f"replicate {vm} ({self.name}): {response.text}")
        report: dict[str, Any] = response.json()
        return seconds, report

    def item(self, vm: str) -> dict[str, Any]:
        found: dict[str, Any] = self.call("GET", f"/items/{vm}")
        return found

    def disable(self, vm: str) -> None:
        self.call("POST", f"/items/{vm}/disable")

    def delete_vm(self, vm: str) -> None:
        self.call("DELETE", f"/vms/{vm}", params={"site": "onprem"})


def agents_setup(root: Path, labs: list[Lab]) -> Setup:
    """The engine and two agents, each in its namespace (tests/netns/conftest.py)."""
    lab = Lab(root)
    labs.append(lab)
    lab.up()
    engine, onprem, cloud = lab.two_sites()
    return Setup("agents", lab, engine, onprem.dir / "site", lab.run_dir("prim"),
                 {"onprem": onprem, "cloud": cloud})  # fmt: skip


def inprocess_setup(root: Path, labs: list[Lab]) -> Setup:
    """The engine alone (in its lab's sr-ctl) with two local sites in its process."""
    lab = Lab(root)
    labs.append(lab)
    lab.up()
    engine = lab.engine().start()
    for name, role in (("onprem", "on-premises"), ("cloud", "cloud")):
        body = {"name": name, "path": str(root / "sites" / name), "role": role}
        engine.call("POST", "/sites", json=body)
        host = {"site": name, "name": f"{name}-hv", "switches": ["lan"]}
        engine.call("POST", "/hosts", json=host)
    return Setup("in-process", lab, engine, root / "sites" / "onprem", lab.run_dir("ctl"))


# -- writing into a VM's disk through its NBD socket ---------------------------------------


def fill(socket: Path, size: int, seed: int) -> None:
    """Random data over the whole disk (4 MiB writes), flushed."""
    import numpy as np

    from siterecovery.disk.nbd import NbdDevice

    rng = np.random.default_rng(seed)
    step = 4 * MiB
    with NbdDevice.connect(socket, "d0", writable=True) as disk:
        for offset in range(0, size, step):
            disk.write(offset, memoryview(rng.bytes(min(step, size - offset))))
        disk.flush()


def change(socket: Path, size: int, amount: int, seed: int) -> None:
    """``amount`` bytes of random data into distinct random 64 KiB blocks, flushed."""
    import numpy as np

    from siterecovery.disk.nbd import NbdDevice

    rng = np.random.default_rng(seed)
    blocks = rng.choice(size // BLOCK, amount // BLOCK, replace=False)
    with NbdDevice.connect(socket, "d0", writable=True) as disk:
        for block in sorted(int(b) for b in blocks):
            disk.write(block * BLOCK, memoryview(rng.bytes(BLOCK)))
        disk.flush()


# -- case 1: a pass ----------------------------------------------------------------------


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def case_pass(setups: list[Setup], args: argparse.Namespace) -> dict[str, Any]:
    size, amount, runs = args.disk_mib * MiB, args.change_mib * MiB, args.runs
    say(f"case pass: {size // MiB} MiB disk filled, {amount // MiB} MiB changed per pass, "
        f"{runs} runs")  # fmt: skip
    out: dict[str, Any] = {"disk_bytes": size, "change_bytes": amount, "runs": runs,
                           "protect": {}, "passes": {}}  # fmt: skip
    for setup in setups:
        setup.create_vm(VM_PASS, size, workload=False)
        started = time.monotonic()
        fill(setup.nbd_socket(VM_PASS), size, seed=1)
        say(f"{setup.name}: disk filled in {time.monotonic() - started:.1f} s")
        out["protect"][setup.name], out["passes"][setup.name] = [], []
    for run in range(runs):
        for setup in setups:
            if run:
                setup.disable(VM_PASS)
            os.sync()
            row: dict[str, Any] = {}
            with metered(setup.lab, row):
                wall, job = setup.protect(VM_PASS, "1h")
            step = next(s for s in job["steps"] if s["name"] == "initial-sync")
            disk = step["detail"]["disks"]["d0"]
            took = _when(step["finished"]) - _when(step["started"])
            last = setup.item(VM_PASS)["last_pass"]["d0"]
            row.update(
                wall_seconds=round(wall, 3),
                step_seconds=round(took.total_seconds(), 3),
                sync_seconds=round(last["seconds"], 3),
                report_seconds=disk["seconds"],
                bytes_written=disk["bytes_written"],
                bytes_on_wire=disk["bytes_on_wire"],
                mode=disk["mode"],
            )
            out["protect"][setup.name].append(row)
            say(
                f"{setup.name}: protect {row['step_seconds']:.2f} s (step), "
                f"{wall:.2f} s (API), {disk['bytes_written'] / MiB:.0f} MiB, cpu {row['cpu']}"
            )
    for run in range(runs):
        for setup in setups:
            change(setup.nbd_socket(VM_PASS), size, amount, seed=100 + run)
            os.sync()
            row = {}
            with metered(setup.lab, row):
                wall, report = setup.replicate(VM_PASS)
            disk = report["disks"]["d0"]
            last = setup.item(VM_PASS)["last_pass"]["d0"]
            row.update(
                wall_seconds=round(wall, 3),
                report_seconds=disk["seconds"],
                sync_seconds=round(last["seconds"], 3),
                bytes_written=disk["bytes_written"],
                bytes_on_wire=disk["bytes_on_wire"],
                source_bytes_read=disk["source_bytes_read"],
                mode=disk["mode"],
                tracking=disk["tracking"],
            )
            out["passes"][setup.name].append(row)
            say(
                f"{setup.name}: pass {disk['seconds']:.2f} s (report), {wall:.2f} s (API), "
                f"sync {row['sync_seconds']:.2f} s, {disk['bytes_written'] / MiB:.1f} MiB "
                f"written, {disk['bytes_on_wire'] / MiB:.1f} MiB on the wire, cpu {row['cpu']}"
            )
    for setup in setups:
        setup.disable(VM_PASS)
        setup.delete_vm(VM_PASS)
    return out


# -- case 2: RPO under churn -------------------------------------------------------------


def _rank(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def case_rpo(setups: dict[str, Setup], args: argparse.Namespace, rate: int) -> list[dict[str, Any]]:
    size = args.disk_mib * MiB
    say(f"case rpo: workload at {rate} records/s (~{rate * MEAN_RECORD / MB:.1f} MB/s), "
        f"interval {args.interval} s, {args.minutes} min per setup")  # fmt: skip
    configs = [("in-process", 0), ("agents", 0), ("agents", args.rpo_link * MB)]
    results = []
    for index, (name, link) in enumerate(configs):
        setup = setups[name]
        vm = f"churn{index}"
        if link:
            setup.lab.rate("prim", link)
        try:
            results.append(_rpo_run(setup, vm, size, link, args))
        finally:
            with contextlib.suppress(Exception):
                setup.disable(vm)
            with contextlib.suppress(Exception):
                setup.delete_vm(vm)
            if link:
                setup.lab.unrate("prim")
    return results


def _rpo_run(
    setup: Setup, vm: str, size: int, link: int, args: argparse.Namespace
) -> dict[str, Any]:
    setup.create_vm(vm, size, workload=True)
    time.sleep(1.0)
    wall, job = setup.protect(vm, args.interval)
    initial = next(s for s in job["steps"] if s["name"] == "initial-sync")["detail"]["point"]["id"]
    say(f"{setup.name}{' tbf' if link else ''}: {vm} protected in {wall:.1f} s; sampling")
    samples: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    errors = 0
    result: dict[str, Any] = {"setup": setup.name, "link_bytes_per_s": link}
    state0, began = setup.workload_state(vm), time.monotonic()
    with metered(setup.lab, result):
        tick = began
        while tick - began < args.minutes * 60:
            tick += 1.0
            time.sleep(max(0.0, tick - time.monotonic()))
            try:
                item = setup.item(vm)
            except Exception as exc:  # a slow or failed GET is counted, not fatal
                errors += 1
                say(f"GET /items/{vm}: {exc}")
                continue
            at = time.monotonic() - began
            samples.append({"t": round(at, 2), "rpo": item["rpo_seconds"]})
            latest = item["latest_point"]
            if latest is not None:
                seen[latest["id"]] = {"point": latest, "last_cycle": item["last_cycle"],
                                      "last_pass": item["last_pass"]}  # fmt: skip
    state1, ended = setup.workload_state(vm), time.monotonic()
    passes = []
    for point_id, entry in sorted(seen.items()):
        if point_id == initial:  # the initial sync's point, not a pass of the run
            continue
        point, last = entry["point"], entry["last_pass"]["d0"]
        end_after_freeze = (_when(entry["last_cycle"]) - _when(point["time"])).total_seconds()
        passes.append({
            "point": point_id, "time": point["time"], "bytes": point["bytes"],
            "sync_seconds": round(last["seconds"], 3),
            "freeze_to_end_seconds": round(end_after_freeze, 3),
            "bytes_on_wire": last.get("bytes_on_wire", 0),
        })  # fmt: skip
    rpos = [s["rpo"] for s in samples if s["rpo"] is not None]
    churn = (state1["bytes"] - state0["bytes"]) / (ended - began)
    result.update(
        churn_bytes_per_s=round(churn),
        records_per_s=round((state1["records"] - state0["records"]) / (ended - began), 1),
        samples=samples,
        sample_errors=errors,
        rpo_p50=_rank(rpos, 0.50) if rpos else None,
        rpo_p95=_rank(rpos, 0.95) if rpos else None,
        rpo_max=max(rpos) if rpos else None,
        passes=passes,
        protect_seconds=round(wall, 2),
    )
    say(
        f"{setup.name}{' tbf' if link else ''}: churn {churn / MB:.2f} MB/s, RPO p50 "
        f"{result['rpo_p50']} p95 {result['rpo_p95']} max {result['rpo_max']}, "
        f"{len(passes)} passes, cpu {result['cpu']}"
    )
    return result


# -- case 3: the wire against nbdcopy ---------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _listening(pid: int, port: int) -> bool:
    """A socket listening on ``port`` in the network namespace of ``pid``."""
    try:
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(f.split()[1].endswith(f":{port:04X}") and f.split()[3] == "0A" for f in lines)


@dataclass
class Contender:
    label: str
    kind: str
    """``ours`` (sync → sync-receive) or ``nbd`` (a client → qemu-nbd)."""
    client: Callable[[str], list[str]]
    """The client's command line, given the target address."""
    server_extra: list[str] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    client_cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    docs: list[dict[str, Any]] = field(default_factory=list)


class Wire:
    """Copies from sr-prim to sr-rec of the agents' lab (see the module doc)."""

    def __init__(self, setup: Setup, root: Path, size: int) -> None:
        self.lab, self.root, self.size = setup.lab, root, size
        self.src = root / "prim" / "src.raw"
        self.dst = root / "rec" / "dst.raw"
        self.rec_addr = self.lab.hosts["rec"].addr
        self.env: dict[str, dict[str, str]] = {}
        for key in ("prim", "rec"):
            for sub in ("home", "tmp"):
                (root / key / sub).mkdir(parents=True, exist_ok=True)
            self.env[key] = self.lab.env(key, root / key / "home", root / key / "tmp")
        self.port = 0

    def make_source(self, seed: int = 7) -> None:
        import numpy as np

        rng = np.random.default_rng(seed)
        with self.src.open("wb") as out:
            for _ in range(self.size // (16 * MiB)):
                out.write(rng.bytes(16 * MiB))
        with self.src.open("rb") as warm:  # in the page cache: read once
            while warm.read(16 * MiB):
                pass

    def run(self, contender: Contender, check: bool) -> None:
        self.dst.unlink(missing_ok=True)
        self.port += 1
        if contender.kind == "ours":
            port = WIRE_PORT + self.port
            log = self.root / "rec" / f"receive-{self.port}.log"
            argv = [SITERECOVERY, "sync-receive", str(self.dst), "--listen",
                    f"tcp://{self.rec_addr}:{port}", "--json", *contender.server_extra]  # fmt: skip
            address = f"tcp://{self.rec_addr}:{port}"
            server = self.lab.spawn("rec", argv, log=log, cwd=self.root / "rec",
                                    env=self.env["rec"])  # fmt: skip
            ready: Callable[[], bool] = lambda: "listening on" in log.read_text()  # noqa: E731
        else:
            port = NBD_PORT + self.port
            with self.dst.open("wb") as blank:
                blank.truncate(self.size)
            log = self.root / "rec" / f"qemu-nbd-{self.port}.log"
            argv = ["qemu-nbd", "-f", "raw", "-b", self.rec_addr, "-p", str(port), "-e", "8",
                    "-t", str(self.dst)]  # fmt: skip
            address = f"nbd://{self.rec_addr}:{port}"
            server = self.lab.spawn("rec", argv, log=log, cwd=self.root / "rec",
                                    env=self.env["rec"])  # fmt: skip
            ready = lambda: _listening(server.pid, port)  # noqa: E731
        try:
            deadline = time.monotonic() + 30
            while not ready():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise LabError(f"{contender.label}: server did not start: {log.read_text()}")
                time.sleep(0.02)
            os.sync()
            before = _children_cpu()
            started = time.perf_counter()
            done = self.lab.run("prim", contender.client(address), cwd=self.root / "prim",
                                env=self.env["prim"], timeout=600)  # fmt: skip
            seconds = time.perf_counter() - started
            middle = _children_cpu()
            if done.returncode != 0:
                raise LabError(f"{contender.label} failed: {done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")  # fmt: skip
            if contender.kind == "nbd":
                server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
            contender.seconds.append(seconds)
            contender.client_cpu.append(round(middle - before, 3))
            contender.server_cpu.append(round(_children_cpu() - middle, 3))
            if done.stdout.lstrip().startswith("{"):
                contender.docs.append(json.loads(done.stdout))
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        if check:  # untimed: the target reads as the source
            same = subprocess.run(["cmp", "-s", str(self.src), str(self.dst)], check=False)
            if same.returncode != 0:
                raise LabError(f"{contender.label}: the target differs from the source")


def case_wire(setup: Setup, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    size = args.wire_mib * MiB
    wire = Wire(setup, root, size)
    say(f"case wire: {size // MiB} MiB random raw image, prim -> rec, {args.runs} runs")
    wire.make_source()
    key = "benchwire"
    setup.call("POST", "/keys", json={"name": key})
    vault = ["--vault", str(setup.engine.vault)]
    src = str(wire.src)
    fast = ["--no-verify", "--no-flush"]

    def ours(*extra: str) -> Callable[[str], list[str]]:
        return lambda address: [SITERECOVERY, "sync", src, address, "--json", *extra]

    def every() -> list[Contender]:
        return [
            Contender("sync (default: verify, flush)", "ours", ours()),
            Contender("sync --no-verify --no-flush", "ours", ours(*fast)),
            Contender("sync --key --no-verify --no-flush", "ours",
                      ours("--key", key, *vault, *fast), ["--key", key, *vault]),
            Contender("nbdcopy", "nbd", lambda address: ["nbdcopy", src, address]),
            Contender("nbdcopy --flush", "nbd",
                      lambda address: ["nbdcopy", "--flush", src, address]),
            Contender("qemu-img convert -n", "nbd",
                      lambda address: ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                       src, address]),
        ]  # fmt: skip

    results: dict[str, Any] = {"bytes": size, "runs": args.runs, "links": []}
    for link in (0, args.wire_link * MB):
        contenders = every()
        if link:  # the link sets the pace: the main contenders only
            contenders = [
                c
                for c in contenders
                if c.label
                in ("sync (default: verify, flush)", "sync --no-verify --no-flush", "nbdcopy")
            ]
            setup.lab.rate("prim", link)
        try:
            for run in range(args.runs):
                for contender in contenders:
                    wire.run(contender, check=run == 0)
                    say(
                        f"wire{' tbf' if link else ''}: {contender.label}: "
                        f"{contender.seconds[-1]:.2f} s, cpu client {contender.client_cpu[-1]} "
                        f"server {contender.server_cpu[-1]}"
                    )
        finally:
            if link:
                setup.lab.unrate("prim")
        results["links"].append({
            "link_bytes_per_s": link,
            "contenders": [
                {"label": c.label, "seconds": [round(s, 3) for s in c.seconds],
                 "median": round(statistics.median(c.seconds), 3),
                 "client_cpu": c.client_cpu, "server_cpu": c.server_cpu,
                 "engine_seconds": [d.get("seconds") for d in c.docs],
                 "bytes_sent": [d.get("bytes_sent") for d in c.docs]}
                for c in contenders
            ],
        })  # fmt: skip
    wire.src.unlink(missing_ok=True)
    wire.dst.unlink(missing_ok=True)
    return results


# -- report ------------------------------------------------------------------------------


def _med(rows: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in rows))


def _cpu_med(rows: list[dict[str, Any]]) -> dict[str, float]:
    names = sorted({n for r in rows for n in r["cpu"]})
    return {n: round(statistics.median(r["cpu"].get(n, 0.0) for r in rows), 2) for n in names}


def _cpu_text(cpu: dict[str, float]) -> str:
    shown = [f"{n} {s:.2f}" for n, s in cpu.items() if s >= 0.05]
    return ", ".join(shown) + f" (sum {sum(cpu.values()):.2f})"


def markdown(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    machine = doc["machine"]
    lines += [
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"{machine['mem_gib']} GiB RAM, kernel {machine['kernel']}; load average "
        f"{machine['load_before']} before, {machine['load_after']} after; "
        f"bench took {doc['seconds']:.0f} s ({'quick' if doc['quick'] else 'full'}).",
        "",
    ]
    if "pass" in doc:
        lines += _pass_table(doc["pass"])
    if "rpo" in doc:
        lines += _rpo_table(doc["rpo"], doc)
    if "wire" in doc:
        lines += _wire_table(doc["wire"])
    return "\n".join(lines)


def _pass_table(case: dict[str, Any]) -> list[str]:
    prot, passes = case["protect"], case["passes"]
    a, b = "in-process", "agents"
    disk_gib = case["disk_bytes"] / GiB

    def row(what: str, x: float, y: float, fmt: str = "{:.2f}") -> str:
        ratio = f"{y / x:.2f}" if x else "—"
        return f"| {what} | {fmt.format(x)} | {fmt.format(y)} | {ratio} |"

    def rate(rows: list[dict[str, Any]]) -> float:
        return float(statistics.median(r["bytes_written"] / GiB / (r["step_seconds"] / 60)
                                       for r in rows))  # fmt: skip

    lines = [
        f"### 1. A replication pass: agents in two namespaces vs in-process sites "
        f"({case['disk_bytes'] // MiB} MiB disk, medians of {case['runs']} interleaved runs)",
        "",
        "| measure | in-process | agents (netns) | agents / in-process |",
        "|---|---:|---:|---:|",
        row(
            "initial full sync: protect step, s",
            _med(prot[a], "step_seconds"),
            _med(prot[b], "step_seconds"),
        ),
        row(
            "initial full sync: API call → job done, s",
            _med(prot[a], "wall_seconds"),
            _med(prot[b], "wall_seconds"),
        ),
        row(
            "initial full sync: s of its sync alone (last_pass)",
            _med(prot[a], "sync_seconds"),
            _med(prot[b], "sync_seconds"),
        ),
        row(
            "initial full sync: GiB/min (written / step s)", rate(prot[a]), rate(prot[b]), "{:.1f}"
        ),
        row(
            "initial full sync: MiB written",
            _med(prot[a], "bytes_written") / MiB,
            _med(prot[b], "bytes_written") / MiB,
            "{:.0f}",
        ),
        row(
            "initial full sync: MiB on the wire",
            _med(prot[a], "bytes_on_wire") / MiB,
            _med(prot[b], "bytes_on_wire") / MiB,
            "{:.0f}",
        ),
        row(
            f"pass after {case['change_bytes'] // MiB} MiB changed: s (report)",
            _med(passes[a], "report_seconds"),
            _med(passes[b], "report_seconds"),
        ),
        row("pass: s (API call)", _med(passes[a], "wall_seconds"), _med(passes[b], "wall_seconds")),
        row(
            "pass: s of its sync alone (last_pass)",
            _med(passes[a], "sync_seconds"),
            _med(passes[b], "sync_seconds"),
        ),
        row(
            "pass: MiB written",
            _med(passes[a], "bytes_written") / MiB,
            _med(passes[b], "bytes_written") / MiB,
            "{:.1f}",
        ),
        row(
            "pass: MiB on the wire",
            _med(passes[a], "bytes_on_wire") / MiB,
            _med(passes[b], "bytes_on_wire") / MiB,
            "{:.1f}",
        ),
        "",
        f"- disk {disk_gib:g} GiB, filled with random data before protect; every run's "
        "figures are in the JSON.",
        f"- CPU s per protect (median): in-process {_cpu_text(_cpu_med(prot[a]))}; "
        f"agents {_cpu_text(_cpu_med(prot[b]))}",
        f"- CPU s per pass (median): in-process {_cpu_text(_cpu_med(passes[a]))}; "
        f"agents {_cpu_text(_cpu_med(passes[b]))}",
        "",
    ]
    return lines


def _rpo_table(runs: list[dict[str, Any]], doc: dict[str, Any]) -> list[str]:
    lines = [
        f"### 2. RPO under churn (interval {doc['args']['interval']} s, "
        f"{doc['args']['minutes']} min per setup, one sample a second)",
        "",
        "| setup | link | churn MB/s | samples | RPO p50 s | p95 s | max s | passes "
        "| pass s median (max) | sync s median | MiB per pass median |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        passes = run["passes"]
        link = (
            f"tbf {run['link_bytes_per_s'] / MB:.0f} MB/s"
            if run["link_bytes_per_s"]
            else ("none" if run["setup"] == "in-process" else "bridge, no limit")
        )
        if passes:
            durations = [p["freeze_to_end_seconds"] for p in passes]
            pass_s = f"{statistics.median(durations):.2f} ({max(durations):.2f})"
            sync_s = f"{statistics.median(p['sync_seconds'] for p in passes):.2f}"
            mib = f"{statistics.median(p['bytes'] for p in passes) / MiB:.1f}"
        else:
            pass_s = sync_s = mib = "—"
        lines.append(
            f"| {run['setup']} | {link} | {run['churn_bytes_per_s'] / MB:.2f} "
            f"| {len(run['samples'])} | {run['rpo_p50']:.1f} | {run['rpo_p95']:.1f} "
            f"| {run['rpo_max']:.1f} | {len(passes)} | {pass_s} | {sync_s} | {mib} |"
        )
    lines += [""]
    for run in runs:
        minutes = doc["args"]["minutes"]
        per_min = {n: round(s / minutes, 1) for n, s in run["cpu"].items()}
        lines.append(f"- {run['setup']}"
                     f"{' + tbf' if run['link_bytes_per_s'] else ''}: CPU s per minute "
                     f"{_cpu_text(per_min)}")  # fmt: skip
    lines += [""]
    return lines


def _wire_table(case: dict[str, Any]) -> list[str]:
    size = case["bytes"]
    lines = [
        f"### 3. The wire vs nbdcopy / qemu-img between the two namespaces "
        f"({size // MiB} MiB random raw, medians of {case['runs']} interleaved runs)",
        "",
        "| link | command | s | MB/s | CPU s client | CPU s server | vs nbdcopy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for link in case["links"]:
        label = (
            f"tbf {link['link_bytes_per_s'] / MB:.0f} MB/s"
            if link["link_bytes_per_s"]
            else "bridge, no limit"
        )
        ref = next(c for c in link["contenders"] if c["label"] == "nbdcopy")["median"]
        for c in link["contenders"]:
            lines.append(
                f"| {label} | {c['label']} | {c['median']:.2f} | {size / MB / c['median']:.0f} "
                f"| {statistics.median(c['client_cpu']):.2f} "
                f"| {statistics.median(c['server_cpu']):.2f} | {c['median'] / ref:.2f} |"
            )
    lines += [""]
    return lines


# -- main --------------------------------------------------------------------------------


def _machine(load_key: str, into: dict[str, Any]) -> None:
    into[load_key] = " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/agents.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="256 MiB disks and image, 1 minute of churn per setup."
    )
    parser.add_argument("--json", metavar="FILE", help="Write every number as JSON.")
    parser.add_argument("--only", default="pass,wire,rpo", help="Cases (default all).")
    parser.add_argument("--runs", type=int, default=3, help="Runs of the short cases.")
    parser.add_argument("--disk-mib", type=int, help="VM disk (default 1024, quick 256).")
    parser.add_argument("--change-mib", type=int, default=64, help="Change per pass.")
    parser.add_argument("--wire-mib", type=int, help="Image of the wire case (1024; quick 256).")
    parser.add_argument("--minutes", type=float, help="Churn per setup (default 3, quick 1).")
    parser.add_argument("--interval", type=float, default=10.0, help="RPO case's interval, s.")
    parser.add_argument("--churn-mb", type=float, default=10.0, help="Guest writes, MB/s.")
    parser.add_argument("--rpo-link", type=int, default=50, help="tbf of the RPO case, MB/s.")
    parser.add_argument("--wire-link", type=int, default=100, help="tbf of the wire case, MB/s.")
    parser.add_argument(
        "--dir", type=Path, help="Scratch directory, kept (default: a new one in /tmp, removed)."
    )
    args = parser.parse_args(argv)
    args.disk_mib = args.disk_mib or (256 if args.quick else 1024)
    args.wire_mib = args.wire_mib or (256 if args.quick else 1024)
    args.minutes = args.minutes or (1.0 if args.quick else 3.0)
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    cases = set(args.only.split(","))
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        raise SystemExit("bench/agents.py needs root, ip and tc (iproute2)")
    for tool in ("nbdcopy", "qemu-nbd", "qemu-img", "cmp"):
        if "wire" in cases and not shutil.which(tool):
            raise SystemExit(f"the wire case needs {tool}")
    # The workload's records/s: read by whichever process spawns a VM's workload
    # (the in-process engine, onprem's agent); only the RPO case's VMs have one.
    rate = max(1, round(args.churn_mb * MB / MEAN_RECORD))
    os.environ["SITERECOVERY_WORKLOAD_RATE"] = str(rate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with `&`
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    cpus = os.cpu_count()
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())  # fmt: skip
    mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)
    doc: dict[str, Any] = {
        "quick": args.quick,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": cpus, "cpu_model": model, "mem_gib": mem,
                    "kernel": platform.release()},
        "page_cache": "sources warm (just written through NBD, or read once); targets new "
                      "files; sync(2) before every timed run",
        "workload_rate_records_per_s": rate,
    }  # fmt: skip
    say(f"{cpus} CPUs ({model}); load average {Path('/proc/loadavg').read_text().strip()}")
    _machine("load_before", doc["machine"])
    root = args.dir or Path(tempfile.mkdtemp(prefix="sr-agents-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    labs: list[Lab] = []
    started = time.monotonic()
    try:
        inproc = inprocess_setup(root / "inproc", labs)
        agents = agents_setup(root / "agents", labs)
        say(
            f"labs up in {time.monotonic() - started:.1f} s: "
            f"{[h.ns for lab in labs for h in lab.hosts.values()]}"
        )
        setups = {"in-process": inproc, "agents": agents}
        if "pass" in cases:
            doc["pass"] = case_pass([inproc, agents], args)
        if "wire" in cases:
            doc["wire"] = case_wire(agents, root / "wire", args)
        if "rpo" in cases:
            doc["rpo"] = case_rpo(setups, args, rate)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for lab in reversed(labs):
            try:
                lab.down()
            except Exception as exc:
                say(f"teardown of {lab.root}: {exc}")
            left = lab.namespaces_left()
            if left:
                say(f"namespaces left behind: {left}")
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    doc["seconds"] = round(time.monotonic() - started, 1)
    _machine("load_after", doc["machine"])
    print(markdown(doc))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        say("interrupted: the labs, their processes and the scratch directory are removed")
        sys.exit(130)
