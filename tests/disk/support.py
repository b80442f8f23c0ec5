"""Helpers shared by the disk tests (byte patterns, digests, a served disk)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import StorageDaemon

MiB = 1024 * 1024
KiB = 1024
DISK_SIZE = 48 * MiB
NODE = "d0"

StartQsd = Callable[..., StorageDaemon]
"""The ``qsd`` fixture: ``qsd(disks, run_dir=None, detached=False)``."""


@dataclass(frozen=True)
class Served:
    """A qcow2 image served by a daemon as node (and export) :data:`NODE`."""

    daemon: StorageDaemon
    image: Path

    def open(self, *, writable: bool = True, bitmap: str | None = None) -> NbdDevice:
        return NbdDevice.connect(self.daemon.nbd_socket, NODE, writable=writable, bitmap=bitmap)


def digest(device: BlockDevice, offset: int = 0, length: int | None = None) -> str:
    """sha256 of a range of a device, read in 1 MiB pieces."""
    length = device.size - offset if length is None else length
    h = hashlib.sha256()
    buf = bytearray(MiB)
    done = 0
    while done < length:
        view = memoryview(buf)[: min(MiB, length - done)]
        device.readinto(offset + done, view)
        h.update(view)
        done += len(view)
    return h.hexdigest()


def sha(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def pattern(byte: int, length: int) -> memoryview:
    """``length`` bytes of ``byte``."""
    return memoryview(bytes([byte]) * length)


def read(device: BlockDevice, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    device.readinto(offset, memoryview(buf))
    return bytes(buf)


def write(device: BlockDevice, offset: int, byte: int, length: int = 64 * KiB) -> None:
    device.write(offset, pattern(byte, length))
