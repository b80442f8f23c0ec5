"""The benchmark's images: sparse disks with scattered random extents, and changed copies.

Everything is deterministic from a seed. Extents are whole 64 KiB blocks (the
granularity of the engine's checksums, of qemu's dirty bitmaps and of qcow2
clusters), so "1% of the blocks changed" means exactly that many blocks.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 64 * 1024


@dataclass(frozen=True)
class Disk:
    path: Path
    size: int
    data_bytes: int


def scattered(path: Path, size: int, *, density: float = 0.5, seed: int = 1) -> Disk:
    """A sparse raw image of ``size`` bytes, about ``density`` of it random data
    in extents of 1-127 blocks separated by holes of 1-127 blocks (mean ratio 1:1
    at density 0.5)."""
    rng = np.random.default_rng(seed)
    blocks = size // BLOCK
    gap_max = max(2, int(128 * (1 - density) / density)) if density < 1 else 1
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    try:
        os.ftruncate(fd, size)
        pos = int(rng.integers(0, gap_max))
        while pos < blocks:
            length = min(int(rng.integers(1, 128)), blocks - pos)
            os.pwrite(fd, rng.bytes(length * BLOCK), pos * BLOCK)
            written += length * BLOCK
            pos += length + int(rng.integers(1, gap_max + 1))
    finally:
        os.close(fd)
    return Disk(path, size, written)


def changed_copy(base: Path, path: Path, *, fraction: float, seed: int) -> int:
    """``path`` = ``base`` with ``fraction`` of its 64 KiB blocks (anywhere: data
    or hole) overwritten with new random data; returns how many blocks changed."""
    copy_sparse(base, path)
    size = base.stat().st_size
    rng = np.random.default_rng(seed)
    count = int(size // BLOCK * fraction)
    chosen = rng.choice(size // BLOCK, size=count, replace=False)
    fd = os.open(path, os.O_WRONLY)
    try:
        for index in np.sort(chosen):
            os.pwrite(fd, rng.bytes(BLOCK), int(index) * BLOCK)
    finally:
        os.close(fd)
    return count


def copy_sparse(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


def to_qcow2(src: Path, dst: Path) -> None:
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(src), str(dst)], check=True
    )


def same_content(a: Path, b: Path) -> bool:
    """``qemu-img compare`` (an independent judge of the guest-visible bytes)."""
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def warm(*paths: Path) -> None:
    """Read every data extent of ``paths`` once (the page cache is then warm)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size, pos = os.fstat(fd).st_size, 0
            while pos < size:
                try:
                    data = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                hole = os.lseek(fd, data, os.SEEK_HOLE)
                while data < hole:
                    data += len(os.pread(fd, min(8 << 20, hole - data), data))
                pos = hole
        finally:
            os.close(fd)
