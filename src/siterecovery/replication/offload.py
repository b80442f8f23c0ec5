"""Full copies between two local images, offloaded to QEMU's block layer.

When ``siterecovery sync --mode full`` copies a local image into another and
at least one of them is not raw (qcow2, vhdx…), moving every byte through two
private NBD servers and Python costs four times what ``qemu-img convert``
does (docs/PERFORMANCE.md). Here one private qemu-storage-daemon opens both
images (no export) and runs a ``blockdev-mirror`` job with ``sync=full``:
QEMU reads the allocated data of the source (its block status skips holes and
zero clusters), writes it to the target in parallel requests and zeroes what
must read as zeroes. This module only starts, follows and cancels that job;
the digests that prove the copy are taken by the caller, as for any sync.

Not offloaded: NBD URLs and receivers (not local files), raw to raw (the
engine is already at ``cp`` speed there), ``tracked`` and ``checksum`` modes,
and resumed syncs (a mirror restarts from zero).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from siterecovery.disk.qmp import QmpClient
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.domain.errors import DiskError, SyncCancelled
from siterecovery.replication.sync import SyncMode, SyncResult

Progress = Callable[[int, int], None]
Cancelled = Callable[[], bool]
JOB = "sr-copy"
PROGRESS_EVERY = 0.25
"""Seconds between two progress reports (and cancel checks)."""


def copy_image(
    source: tuple[Path, str],
    target: tuple[Path, str],
    *,
    flush: bool = True,
    progress: Progress | None = None,
    cancelled: Cancelled | None = None,
) -> SyncResult:
    """Make the image ``target`` (path, format) read as ``source``; what it did.

    ``flush`` False opens the target with ``cache.no-flush`` (QEMU's mirror
    flushes its target before it reports ready). ``bytes_read`` and
    ``bytes_written`` are what QEMU's job counted as copied
    (the source's allocated data; holes and zero clusters are not read).
    Raises SyncCancelled (resume offset 0) when ``cancelled()`` said so, or
    DiskError when QEMU reports the job failed.
    """
    started = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))
    daemon = StorageDaemon.start(
        run_dir,
        [
            DiskSpec("src", source[0], fmt=source[1], writable=False, export=False),
            DiskSpec("dst", target[0], fmt=target[1], writable=True, export=False, flush=flush),
        ],
        detached=False,
    )
    try:
        qmp = daemon.qmp()
        qmp.execute(
            "blockdev-mirror",
            **{"job-id": JOB, "device": "src", "target": "dst", "sync": "full"},
            **{"auto-dismiss": False},
        )
        copied = _follow(qmp, progress, cancelled)
        qmp.execute("job-complete", id=JOB)
        _concluded(qmp)
        qmp.execute("job-dismiss", id=JOB)
    finally:
        daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return SyncResult(
        mode=SyncMode.FULL,
        bytes_read=copied,
        bytes_written=copied,
        bytes_zeroed=0,
        blocks_changed=0,
        extents_planned=0,
        resumed_from=0,
        seconds=time.monotonic() - started,
        bytes_planned=copied,
    )


def _follow(qmp: QmpClient, progress: Progress | None, cancelled: Cancelled | None) -> int:
    """Wait until the mirror is ready (every byte copied); the bytes it copied."""
    while True:
        job = _job(qmp)
        if job.get("error"):
            raise DiskError(detail=f"the QEMU copy job failed: {job['error']}")
        done, total = int(job["current-progress"]), int(job["total-progress"])
        if progress is not None:
            progress(done, total)
        if job["status"] == "ready":
            return total
        if cancelled is not None and cancelled():
            qmp.execute("job-cancel", id=JOB)
            _await(qmp, "concluded")
            raise SyncCancelled(what="full copy", resume_offset=0)
        _await(qmp, "ready", timeout=PROGRESS_EVERY)


def _await(qmp: QmpClient, status: str, *, timeout: float = 3600.0) -> None:
    """Wait for the job's status change to ``status`` (at most ``timeout`` s)."""
    with contextlib.suppress(DiskError):  # a timeout: the caller looks again
        qmp.wait_event(
            "JOB_STATUS_CHANGE",
            lambda data: data.get("id") == JOB and data.get("status") == status,
            timeout=timeout,
        )


def _job(qmp: QmpClient) -> dict[str, Any]:
    for job in qmp.execute("query-jobs"):
        if job["id"] == JOB:
            found: dict[str, Any] = job
            return found
    raise DiskError(detail="the QEMU copy job vanished")


def _concluded(qmp: QmpClient) -> None:
    """Wait for the job to conclude; DiskError if QEMU says it failed."""
    job = _job(qmp)
    while job["status"] != "concluded":
        _await(qmp, "concluded", timeout=PROGRESS_EVERY)
        job = _job(qmp)
    if job.get("error"):
        raise DiskError(detail=f"the QEMU copy job failed: {job['error']}")
