"""Extent-list algebra and a device wrapper that widens its dirty map."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from siterecovery.disk.base import BlockDevice, Extent


def union(a: Iterable[Extent], b: Iterable[Extent], *, size: int) -> list[Extent]:
    """The dirty ranges of ``a`` ∪ ``b`` covering ``[0, size)`` exactly, in order.

    Only extents with ``dirty=True`` count; the gaps come back with ``dirty=False``.
    """
    ranges = sorted((e.start, e.end) for e in (*a, *b) if e.dirty and e.length > 0)
    merged: list[tuple[int, int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return list(_cover(merged, size))


def _cover(dirty: list[tuple[int, int]], size: int) -> Iterator[Extent]:
    position = 0
    for start, end in dirty:
        if start > position:
            yield Extent(position, start - position, dirty=False)
        yield Extent(start, min(end, size) - start, dirty=True)
        position = min(end, size)
    if position < size:
        yield Extent(position, size - position, dirty=False)


def clip(extents: Iterable[Extent], offset: int, end: int) -> Iterator[Extent]:
    """The parts of ``extents`` inside ``[offset, end)``."""
    for extent in extents:
        start, stop = max(extent.start, offset), min(extent.end, end)
        if start < stop:
            yield Extent(start, stop - start, zero=extent.zero, dirty=extent.dirty)


class UnionDirtyDevice:
    """A device whose dirty map also marks ``extra`` ranges dirty.

    Used when the target of a sync changed on its own since the shared
    checkpoint: those ranges must be rewritten from the source too. Everything
    else is delegated; clones share ``extra``.
    """

    def __init__(self, inner: BlockDevice, extra: list[Extent]) -> None:
        self._inner = inner
        self._extra = extra

    @property
    def size(self) -> int:
        return self._inner.size

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._inner.readinto(offset, buf)

    def write(self, offset: int, buf: memoryview) -> None:
        self._inner.write(offset, buf)

    def zero(self, offset: int, length: int) -> None:
        self._inner.zero(offset, length)

    def flush(self) -> None:
        self._inner.flush()

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        return self._inner.extents(offset, length)

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        end = self.size if length is None else offset + length
        merged = union(self._inner.dirty_extents(), self._extra, size=self.size)
        return clip(merged, offset, end)

    def clone(self) -> BlockDevice:
        return UnionDirtyDevice(self._inner.clone(), self._extra)

    def close(self) -> None:
        self._inner.close()
