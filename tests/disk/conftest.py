"""Fixtures of the disk tests: real qemu-storage-daemon processes in short temp dirs.

Unix socket paths are limited to 107 bytes, so daemons run in a short directory
under /tmp rather than in pytest's (long) ``tmp_path``. Every daemon started
through the ``qsd`` fixture is stopped at teardown, even when the test fails.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.qsd import DiskSpec, StorageDaemon

from .support import DISK_SIZE, NODE, Served, StartQsd


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short, private directory (sockets fit), removed at teardown."""
    path = Path(tempfile.mkdtemp(prefix="srd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def qsd(workdir: Path) -> Iterator[StartQsd]:
    """``qsd(disks, run_dir=None, detached=False)`` starts a daemon; every daemon
    started so is stopped at teardown."""
    started: list[StorageDaemon] = []

    def start(
        disks: Sequence[DiskSpec], run_dir: Path | None = None, detached: bool = False
    ) -> StorageDaemon:
        daemon = StorageDaemon.start(run_dir or workdir / "run", disks, detached=detached)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop(timeout=5)


@pytest.fixture
def served(workdir: Path, qsd: StartQsd) -> Served:
    """A fresh, empty 48 MiB qcow2 served as node ``d0``."""
    image = workdir / "disk.qcow2"
    qemu_img.create(image, DISK_SIZE)
    return Served(qsd([DiskSpec(NODE, image)]), image)
