"""Block digests of a disk, and a whole-disk digest that ignores allocation.

Both hash fixed blocks with xxh3_128 (16-byte digests). A block the allocation
map reports as zero is never read: it gets the precomputed digest of a zero
block, which is also what reading and hashing its zeroes would give, so a hole
and written zeroes hash the same and the digest does not depend on how either
side stored its zeroes.

:func:`block_digests` is what each side of a checksum sync runs where its disk
lives (only the digests need to cross between sites); :func:`disk_digest`
reduces the 1 MiB block digests and the disk size to one string with blake3,
the integrity proof recorded after every sync.

Threads: each worker hashes its own chunks through its own :meth:`clone` of the
device, into one reused buffer. ``xxhash``'s streaming ``update`` releases the
GIL (measured: 2 threads hash twice as fast; its one-shot ``xxh3_128_digest``
does not), so reads and hashing overlap across workers.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, runtime_checkable

import blake3
import numpy as np
import numpy.typing as npt
import xxhash

from siterecovery.disk.base import BlockDevice, Extent
from siterecovery.domain.errors import IntegrityError, InvalidInput, SyncCancelled

DIGEST_SIZE = 16
"""Bytes of one block digest (xxh3_128)."""

DISK_BLOCK_SIZE = 1024 * 1024
"""Block size of :func:`disk_digest` (bytes); part of its algorithm name."""

DISK_DIGEST_ALGORITHM = "blk1m-xxh3+blake3"
"""Prefix of every :func:`disk_digest` value: names the algorithm."""

CHUNK_SIZE = 4 * 1024 * 1024
"""Largest read of a hashing worker (bytes), rounded down to whole blocks."""

Digests = npt.NDArray[np.uint8]
"""Block digests: shape ``(blocks, DIGEST_SIZE)``, in block order."""

OnRead = Callable[[int], None]
"""Called with the number of bytes just read; must be thread-safe."""

Cancelled = Callable[[], bool]
"""Polled between chunks; True stops the work with SyncCancelled."""


def block_hash(view: memoryview) -> bytes:
    """The xxh3_128 digest of ``view`` (streaming API: releases the GIL)."""
    hasher = xxhash.xxh3_128()
    hasher.update(view)
    return hasher.digest()


@functools.lru_cache(maxsize=16)
def zero_digest(length: int) -> bytes:
    """The digest of ``length`` zero bytes (cached: computed once per length)."""
    return block_hash(memoryview(bytes(length)))


def coarsen(extents: Iterable[Extent], block_size: int, start: int, end: int) -> Iterator[Extent]:
    """The allocation map of ``[start, end)`` at block granularity.

    ``start`` is a multiple of ``block_size``; ``end`` is one too, or the end of
    the disk. A block is zero only when the extents cover all of it with zeroes;
    every other block is data. The result covers the range exactly, in order.
    """
    pos = start
    for run_start, run_end in _zero_runs(extents):
        zero_start = -(-run_start // block_size) * block_size
        zero_end = run_end if run_end == end else run_end // block_size * block_size
        if zero_end <= zero_start:
            continue
        if zero_start > pos:
            yield Extent(pos, zero_start - pos)
        yield Extent(zero_start, zero_end - zero_start, zero=True)
        pos = zero_end
    if pos < end:
        yield Extent(pos, end - pos)


def _zero_runs(extents: Iterable[Extent]) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each run of adjacent zero extents."""
    run: tuple[int, int] | None = None
    for extent in extents:
        if extent.zero:
            run = (run[0] if run else extent.start, extent.end)
        elif run:
            yield run
            run = None
    if run:
        yield run


def hash_plan(
    dev: BlockDevice, block_size: int, offset: int = 0, length: int | None = None
) -> list[Extent]:
    """The allocation map of the range at block granularity (:func:`coarsen`).

    What :func:`block_digests` works from: made once (one scan of the map;
    ``SEEK_DATA``/``SEEK_HOLE`` on ext4 cost more than reading the range from
    the page cache when asked chunk by chunk), it can be passed to
    :func:`bytes_to_hash` and :func:`block_digests` of the same range.
    """
    end = _range_end(dev, block_size, offset, length)
    return list(coarsen(dev.extents(offset, end - offset), block_size, offset, end))


def bytes_to_hash(
    dev: BlockDevice,
    block_size: int,
    offset: int = 0,
    length: int | None = None,
    *,
    plan: Sequence[Extent] | None = None,
) -> int:
    """How many bytes :func:`block_digests` will read for the same range."""
    plan = hash_plan(dev, block_size, offset, length) if plan is None else plan
    return sum(extent.length for extent in plan if not extent.zero)


def block_digests(
    dev: BlockDevice,
    block_size: int,
    *,
    offset: int = 0,
    length: int | None = None,
    threads: int = 2,
    on_read: OnRead | None = None,
    cancelled: Cancelled | None = None,
    plan: Sequence[Extent] | None = None,
) -> Digests:
    """Digests of the blocks of ``[offset, offset + length)`` (default: to the end).

    ``offset`` must be a multiple of ``block_size``; the last block may be
    short (its digest is that of its bytes). Zero blocks are not read.
    ``plan`` is :func:`hash_plan` of the same range (made here when None).
    ``dev`` itself is not used for I/O, only cloned (one clone per thread).
    Raises SyncCancelled when ``cancelled()`` (polled between chunks, from any
    worker thread, one call at a time) returns True, and the first error of a
    worker after joining them all.
    """
    end = _range_end(dev, block_size, offset, length)
    plan = hash_plan(dev, block_size, offset, end - offset) if plan is None else plan
    blocks = -(-(end - offset) // block_size)
    out: Digests = np.empty((blocks, DIGEST_SIZE), dtype=np.uint8)
    job = _HashJob(dev, block_size, offset, out, plan, on_read or _ignore, cancelled)
    job.run(max(1, threads))
    return out


def disk_digest(dev: BlockDevice, *, threads: int = 2, cancelled: Cancelled | None = None) -> str:
    """The whole-disk digest: ``"blk1m-xxh3+blake3:<hex>"``.

    blake3 over the 1 MiB block digests in order, then the disk size (8 bytes,
    little endian). Independent of allocation: a hole and written zeroes give
    the same digest. Two disks have equal digests iff (barring collisions)
    they have the same size and content.
    """
    digests = block_digests(dev, DISK_BLOCK_SIZE, threads=threads, cancelled=cancelled)
    hasher = blake3.blake3()
    hasher.update(digests.data.cast("B"))
    hasher.update(dev.size.to_bytes(8, "little"))
    return f"{DISK_DIGEST_ALGORITHM}:{hasher.hexdigest()}"


@runtime_checkable
class HashesItself(Protocol):
    """A device whose owner computes its whole-disk digest where the disk is
    (a wire target: the receiver hashes its own disk, only the digest crosses)."""

    def disk_digest(self) -> str: ...


def whole_digest(dev: BlockDevice) -> str:
    """:func:`disk_digest` of ``dev``, computed where its disk lives."""
    return dev.disk_digest() if isinstance(dev, HashesItself) else disk_digest(dev)


def integrity_proof(src: BlockDevice, dst: BlockDevice, disk: str) -> dict[str, str]:
    """Whole-disk digests of a source and its copy: ``{"source_digest",
    "target_digest"}``, equal, or IntegrityError naming ``disk``. Each is
    computed where its disk is (see :func:`whole_digest`): a copy at another
    site is not read back, and is hashed there while the source is hashed here."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="proof") as pool:
        theirs = pool.submit(whole_digest, dst)
        source = whole_digest(src)
        target = theirs.result()
    if source != target:
        raise IntegrityError(what=f"disk {disk}", source=source, target=target)
    return {"source_digest": source, "target_digest": target}


def _range_end(dev: BlockDevice, block_size: int, offset: int, length: int | None) -> int:
    if block_size <= 0:
        raise InvalidInput(field="block_size", reason=f"{block_size} is not positive")
    if offset % block_size:
        raise InvalidInput(field="offset", reason=f"{offset} is not a multiple of {block_size}")
    return dev.size if length is None else offset + length


def _ignore(nbytes: int) -> None:
    pass


class _HashJob:
    """Hashes the extents of one plan with several workers into ``out``.

    Zero extents are one item each (their digests are filled in at once);
    data extents are cut into items of at most :data:`CHUNK_SIZE`.
    """

    def __init__(
        self,
        dev: BlockDevice,
        block_size: int,
        start: int,
        out: Digests,
        plan: Sequence[Extent],
        on_read: OnRead,
        cancelled: Cancelled | None,
    ) -> None:
        self._dev = dev
        self._block_size = block_size
        self._start = start
        self._rows = out
        self._out = out.data.cast("B")
        self._on_read = on_read
        self._cancelled = cancelled
        self._chunk = max(block_size, CHUNK_SIZE // block_size * block_size)
        self._items = _pieces(plan, self._chunk)
        self._zero_row = np.frombuffer(zero_digest(block_size), dtype=np.uint8)
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []

    def run(self, threads: int) -> None:
        """Run the workers, join them all, re-raise the first error."""
        workers = [threading.Thread(target=self._work, name=f"hash-{i}") for i in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if self._errors:
            raise self._errors[0]

    def _work(self) -> None:
        try:
            dev = self._dev.clone()
            try:
                self._hash_items(dev, memoryview(bytearray(self._chunk)))
            finally:
                dev.close()
        except BaseException as e:
            self._errors.append(e)

    def _hash_items(self, dev: BlockDevice, buf: memoryview) -> None:
        while (extent := self._take()) is not None:
            if extent.zero:
                self._put_zeroes(extent)  # Fast path.
            else:
                self._hash_data(dev, extent, buf)  # Slow path.

    def _take(self) -> Extent | None:
        """The next item to hash, or None when done or stopping."""
        with self._lock:
            if self._errors:
                return None
            if self._cancelled is not None and self._cancelled():
                raise SyncCancelled(what="block digest")
            return next(self._items, None)

    def _put_zeroes(self, extent: Extent) -> None:
        first = (extent.start - self._start) // self._block_size
        full, tail = divmod(extent.length, self._block_size)
        self._rows[first : first + full] = self._zero_row
        if tail:
            self._put(extent.end - tail, zero_digest(tail))

    def _hash_data(self, dev: BlockDevice, extent: Extent, buf: memoryview) -> None:
        view = buf[: extent.length]
        dev.readinto(extent.start, view)
        self._on_read(extent.length)
        for pos in range(0, extent.length, self._block_size):
            self._put(extent.start + pos, block_hash(view[pos : pos + self._block_size]))

    def _put(self, offset: int, digest: bytes) -> None:
        index = (offset - self._start) // self._block_size * DIGEST_SIZE
        self._out[index : index + DIGEST_SIZE] = digest


def _pieces(plan: Sequence[Extent], chunk: int) -> Iterator[Extent]:
    """Zero extents whole; data extents cut into pieces of at most ``chunk`` bytes."""
    for extent in plan:
        if extent.zero:
            yield extent
            continue
        for pos in range(extent.start, extent.end, chunk):
            yield Extent(pos, min(chunk, extent.end - pos))
