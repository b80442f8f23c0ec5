"""What a sync must do: the plan, as extents in offset order.

``zero`` extents are made zero on the target without reading; the others are
read and copied. The plan comes from the source's allocation map (``full``),
its dirty map intersected with the allocation map (``tracked``) or the
difference of two digest arrays (``checksum``, see :func:`diff`). Pure
functions: no I/O except the extent queries of :func:`allocation_plan`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from siterecovery.disk.base import BlockDevice, Extent, merge_touching
from siterecovery.disk.digest import Digests, zero_digest
from siterecovery.domain.errors import DiskError


@dataclass(frozen=True, slots=True)
class Plan:
    """Extents in offset order: ``zero`` ones are zeroed on dst, others copied.

    ``blocks_changed`` is known only for checksum plans; ``bytes_hashed``
    counts the bytes read (on both sides) to make the plan.
    """

    extents: list[Extent]
    blocks_changed: int | None = None
    bytes_hashed: int = 0

    @property
    def bytes_to_copy(self) -> int:
        return sum(e.length for e in self.extents if not e.zero)


def allocation_plan(src: BlockDevice, start: int, *, tracked: bool, skip_zero: bool) -> Plan:
    """The plan of a ``full`` (or, with ``tracked``, a ``tracked``) sync from ``start``.

    ``skip_zero`` drops zero extents (the target reads as zeroes already).
    """
    if tracked:
        extents = list(merge_touching(intersect(src.dirty_extents(start), src.extents(start))))
    else:
        extents = list(src.extents(start))
    return Plan([e for e in extents if not (e.zero and skip_zero)])


def intersect(dirty: Iterable[Extent], allocation: Iterable[Extent]) -> Iterator[Extent]:
    """The dirty parts of the allocation map (both cover the same range, in order)."""
    alloc = iter(allocation)
    current = Extent(0, 0)
    for extent in dirty:
        pos = extent.start
        while extent.dirty and pos < extent.end:
            while current.end <= pos:
                current = _next_extent(alloc, pos)
            end = min(extent.end, current.end)
            yield Extent(pos, end - pos, zero=current.zero)
            pos = end


def _next_extent(extents: Iterator[Extent], pos: int) -> Extent:
    extent = next(extents, None)
    if extent is None:
        raise DiskError(detail=f"the allocation map ends before the dirty map, at {pos}")
    return extent


def diff(ours: Digests, theirs: Digests, start: int, bs: int, end: int) -> tuple[list[Extent], int]:
    """Runs of differing blocks of ``[start, end)``, and how many blocks differ.

    A run is ``zero`` when our blocks in it all read as zeroes. Both arrays
    hold one digest per ``bs`` block from ``start`` (the last may be short).
    """
    changed = np.flatnonzero((ours != theirs).any(axis=1))
    zero = zero_blocks(ours, bs, end - start)[changed]
    breaks = np.flatnonzero((np.diff(changed) != 1) | (np.diff(zero) != 0)) + 1
    extents = []
    for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(changed)], strict=True):
        if last > first:
            run_start = start + int(changed[first]) * bs
            run_end = min(end, start + (int(changed[last - 1]) + 1) * bs)
            extents.append(Extent(run_start, run_end - run_start, zero=bool(zero[first])))
    return extents, len(changed)


def zero_blocks(digests: Digests, bs: int, length: int) -> npt.NDArray[np.bool_]:
    """Which blocks read as zeroes (the last block may be short)."""
    zero_row = np.frombuffer(zero_digest(bs), dtype=np.uint8)
    zero: npt.NDArray[np.bool_] = (digests == zero_row).all(axis=1)
    if length % bs:
        zero[-1] = digests[-1].tobytes() == zero_digest(length % bs)
    return zero


def items(extents: Iterable[Extent], chunk_size: int) -> Iterator[Extent]:
    """The plan cut at multiples of ``chunk_size`` (disk offsets), in order."""
    for extent in extents:
        pos = extent.start
        while pos < extent.end:
            end = min(extent.end, (pos // chunk_size + 1) * chunk_size)
            yield Extent(pos, end - pos, zero=extent.zero)
            pos = end
