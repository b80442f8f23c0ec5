"""What a sync is asked to do and what it did: :class:`SyncMode`,
:class:`SyncOptions`, :class:`SyncResult`.

Apart from the engine (:mod:`siterecovery.replication.sync`, which
re-exports them) so that code that only describes a sync, like the
``siterecovery sync`` command line or a copy offloaded to QEMU
(:mod:`siterecovery.replication.offload`), loads neither the engine nor numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from siterecovery.domain.errors import InvalidInput

KiB = 1024
MiB = 1024 * KiB


class SyncMode(StrEnum):
    FULL = "full"
    TRACKED = "tracked"
    CHECKSUM = "checksum"


@dataclass(frozen=True, slots=True)
class SyncOptions:
    """How to sync. Sizes and offsets are bytes.

    ``threads`` is the number of readers, and of hashers on each side in
    checksum mode; writers are half as many (at least one). Each worker has its
    own source or target handle (so its own NBD or wire connection). Measured
    (docs/PERFORMANCE.md): buffered writes to one file serialise on its inode
    lock, so one writer is best there; an NBD target does best with two.

    ``chunk_size`` is the largest read, write or zero sent in one request
    (one work item, one buffer, one wire frame) and a multiple of
    ``block_size``. Its 1 MiB default was measured (docs/PERFORMANCE.md):
    buffers that stay in the CPU caches copy up to twice as fast as 4 MiB
    ones, and fewer than ~256 KiB costs more in per-item overhead.

    ``block_size`` is the unit of checksum comparison and of zero detection in
    copied data. Its 64 KiB default comes from a measurement on a 256 MiB file
    in the page cache (``block_digests`` with 1/2 threads): 4 KiB hashes at
    7.8/11 GB/s, 16 KiB at 11.8/17.8, 64 KiB at 13.5/20.9, 1 MiB at
    14.6/24.8. Past 64 KiB the speed barely grows (and is ten times what a
    disk reads) while every scattered change costs more bytes to send; 64 KiB
    is also the granularity of qemu dirty bitmaps and of qcow2 clusters, and
    its digests weigh 1/4096 of the disk.

    ``resume_offset`` is a value once passed to ``checkpoint``; nothing below
    it is read or written (checksum mode rounds it down to a block).
    ``target_is_blank`` says the target reads as zeroes already (a new sparse
    image): zero ranges then need no request at all. ``checkpoint_every``
    is how many bytes read for copying may pass between two checkpoints.
    ``flush`` False never flushes the target (and then ``checkpoint`` must
    not be given): for copies whose durability the caller handles, like
    ``cp`` or ``qemu-img convert`` do by default.
    """

    mode: SyncMode
    threads: int = 4
    chunk_size: int = 1 * MiB
    block_size: int = 64 * KiB
    resume_offset: int = 0
    target_is_blank: bool = False
    checkpoint_every: int = 64 * MiB
    flush: bool = True

    def __post_init__(self) -> None:
        for name in ("threads", "chunk_size", "block_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise InvalidInput(field=name, reason=f"{getattr(self, name)} is not positive")
        if self.chunk_size % self.block_size:
            raise InvalidInput(
                field="chunk_size",
                reason=f"{self.chunk_size} is not a multiple of block_size {self.block_size}",
            )
        if self.resume_offset < 0:
            raise InvalidInput(field="resume_offset", reason=f"{self.resume_offset} is negative")


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What a finished sync did. Bytes are counts of bytes, ``seconds`` wall time.

    ``bytes_read`` was read from the source to be copied; ``bytes_hashed`` was
    read from either disk to be hashed (checksum mode only; the target's
    part is counted where the target lives). ``blocks_changed`` counts
    differing blocks in checksum mode and chunks that wrote or zeroed
    something in the other modes. ``bytes_planned`` is what the plan said to
    copy (equal to ``bytes_read`` for a sync that finished).
    """

    mode: SyncMode
    bytes_read: int
    bytes_written: int
    bytes_zeroed: int
    blocks_changed: int
    extents_planned: int
    resumed_from: int
    seconds: float
    bytes_hashed: int = 0
    bytes_planned: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``mode`` as its string value)."""
        return {**asdict(self), "mode": str(self.mode)}
