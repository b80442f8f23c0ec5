"""Timing of commands for the benchmark: interleaved runs, medians, clean page cache state.

Every timed run starts from the same state: the target prepared (untimed),
then ``sync(2)`` so that dirty pages left by the previous run are not
written back during this one. Sources stay in the page cache (warm).
Commands of one group run in turn, round after round, so that the noise of
this machine (shared vCPUs: ±30% from run to run) hits them alike.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SR = [sys.executable, "-m", "siterecovery"]


@dataclass
class Contender:
    """One command of a group: ``prepare`` (untimed), then ``argv`` timed."""

    label: str
    argv: Callable[[], list[str]]
    prepare: Callable[[], None] = lambda: None
    finish: Callable[[], None] = lambda: None
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    """CPU seconds (user + system) of each run's command, process start included."""
    docs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def run_group(contenders: Sequence[Contender], runs: int) -> None:
    """``runs`` rounds; in each, every contender once, in order."""
    for _ in range(runs):
        for contender in contenders:
            contender.prepare()
            os.sync()
            argv = contender.argv()
            cpu = _children_cpu()
            started = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True)
            contender.seconds.append(time.perf_counter() - started)
            contender.cpu.append(_children_cpu() - cpu)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr[-2000:]}")
            contender.outputs.append(done.stdout)
            if done.stdout.lstrip().startswith("{"):
                contender.docs.append(json.loads(done.stdout))
            contender.finish()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class Qsd:
    """A qemu-storage-daemon serving images as NBD exports (for nbdcopy and tracked cases)."""

    def __init__(self, exports: Sequence[tuple[str, Path, bool]], bitmap: str | None = None):
        from siterecovery.disk.qsd import DiskSpec, StorageDaemon

        self.dir = Path(tempfile.mkdtemp(prefix="srb-", dir="/tmp"))
        specs = [DiskSpec(name, path, writable=writable) for name, path, writable in exports]
        self.daemon = StorageDaemon.start(self.dir, specs, detached=False)
        if bitmap is not None:
            name = exports[0][0]
            self.daemon.qmp().execute(
                "block-export-add", type="nbd", id=f"{name}-bm", name=f"{name}-bm",
                writable=True, bitmaps=[bitmap], **{"node-name": name},
            )  # fmt: skip

    def url(self, export: str, bitmap: str | None = None) -> str:
        query = f"&bitmap={bitmap}" if bitmap else ""
        return f"nbd+unix:///{export}?socket={self.daemon.nbd_socket}{query}"

    def stop(self) -> None:
        self.daemon.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class ReceiverProcess:
    """``siterecovery sync-receive TARGET`` started (untimed) before a timed sender."""

    def __init__(self, target: Path, *extra: str) -> None:
        self.process = subprocess.Popen(
            [*SR, "sync-receive", str(target), "--json", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"receiver did not start: {line}{self.process.stderr.read()}")
        self.address = line.split()[-1]
        self._ready_cpu = _process_cpu(self.process.pid)
        self.cpu = 0.0
        """After :meth:`wait`: CPU seconds it spent once listening (its start excluded)."""

    def wait(self) -> dict[str, Any]:
        before = _children_cpu()
        out, err = self.process.communicate(timeout=300)
        self.cpu = _children_cpu() - before - self._ready_cpu
        if self.process.returncode != 0:
            raise RuntimeError(f"receiver failed: {err[-2000:]}")
        doc: dict[str, Any] = json.loads(out)
        return doc


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running child has used so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rsync_stats(output: str) -> dict[str, int]:
    """Sent and literal bytes from ``rsync --stats``."""
    found: dict[str, int] = {}
    for line in output.splitlines():
        name, _, value = line.partition(":")
        number = value.strip().split(" ")[0].replace(",", "")
        if name.strip() in ("Literal data", "Total bytes sent", "Total bytes received"):
            found[name.strip()] = int(number) if number.isdigit() else 0
    return found
