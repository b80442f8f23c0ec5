"""The block-device interface every disk is read and written through.

A :class:`BlockDevice` is a fixed-size byte-addressable disk: a raw file, an NBD
export served by qemu-storage-daemon, later a page blob. The sync engine, the
replication cycle, the workload checker and the digest code see only this
interface. Cross-cutting behaviour (rate limiting, counting, cancellation) is a
wrapper implementing the same protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Extent:
    """A byte range of a disk.

    ``zero`` is true when the range reads as zeroes (a hole or a zero cluster):
    it need not be read. ``dirty`` is true when the range was written since the
    checkpoint an extent list was asked about (only meaningful for
    :meth:`BlockDevice.dirty_extents`).
    """

    start: int
    length: int
    zero: bool = False
    dirty: bool = True

    @property
    def end(self) -> int:
        return self.start + self.length


def merge_touching(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Join extents that touch and are of the same kind (``zero`` and ``dirty``)."""
    current: Extent | None = None
    for extent in extents:
        if (
            current is not None
            and current.end == extent.start
            and (current.zero, current.dirty) == (extent.zero, extent.dirty)
        ):
            current = replace(current, length=current.length + extent.length)
            continue
        if current is not None:
            yield current
        current = extent
    if current is not None:
        yield current


@runtime_checkable
class BlockDevice(Protocol):
    """A disk opened for block I/O.

    Offsets and lengths are bytes. Methods are *not* thread-safe: each worker
    thread uses its own device from :meth:`clone`. Every method raises
    :class:`siterecovery.domain.errors.DiskError` (never a foreign error).
    """

    @property
    def size(self) -> int:
        """Virtual size in bytes (constant while open)."""
        ...

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` from ``offset``; loops on short reads.

        Reading past ``size`` raises DiskError.
        """
        ...

    def write(self, offset: int, buf: memoryview) -> None:
        """Write all of ``buf`` at ``offset``; loops on short writes."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeroes, punching holes where the backend can."""
        ...

    def flush(self) -> None:
        """Make every completed write durable. Idempotent."""
        ...

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Allocation map of the range, in order, covering it exactly.

        Extents with ``zero=True`` read as zeroes and need not be read or sent.
        """
        ...

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Ranges written since the checkpoint this device was opened against.

        Covers the range exactly, in order; ``dirty`` tells which parts changed.
        Raises DiskError when the device was opened without a checkpoint.
        """
        ...

    def clone(self) -> BlockDevice:
        """A new independent handle on the same disk, for another thread."""
        ...

    def close(self) -> None:
        """Release the handle. Idempotent."""
        ...


@runtime_checkable
class EarlyWriteback(Protocol):
    """A device that can start writing a range to stable storage ahead of flush.

    A durable sync calls it after each write so the disk writes while the copy
    goes on, and the final flush has little left to wait for.
    """

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing ``[offset, offset + length)`` out, without waiting. A hint:
        only :meth:`BlockDevice.flush` makes anything durable."""
        ...
