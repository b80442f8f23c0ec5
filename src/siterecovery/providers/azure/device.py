"""A :class:`~siterecovery.disk.base.BlockDevice` over an Azure page blob (or a snapshot).

* Alignment: page blobs are written in 512-byte pages. :meth:`PageBlobDevice.write`
  and :meth:`PageBlobDevice.zero` refuse (DiskError) an offset or a length that
  is not a multiple of 512: a read-modify-write of a shared page would race
  with the other writer threads. The sync engine writes whole blocks.
* Writes: each buffer is scanned in 512-byte pages; runs of data go up as
  ``Put Page`` calls of at most 4 MiB (Azure's limit), runs of zeroes are
  cleared (``Clear Page``, which frees them), never uploaded.
* Reads: the page ranges of the read's span are asked first; holes are filled
  with zeroes without a request, data ranges are downloaded into the caller's
  buffer. A snapshot never changes, so its page ranges are asked once, when opened.
* Durability: a ``Put Page`` is durable once acknowledged; :meth:`flush` does nothing.
* No change tracking (the page-range diff is not used: Azurite's is wrong):
  :meth:`dirty_extents` refuses.
* Threads: the device holds no mutable state but its closed flag, and azure-core
  clients are thread-safe, so a device may be shared by writer threads; :meth:`clone`
  gives a handle on the same blob anyway, as the protocol asks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
from azure.storage.blob import BlobClient, PageRange

from siterecovery.disk.base import Extent, merge_touching
from siterecovery.domain.errors import DiskError
from siterecovery.providers.azure.config import AzureSiteConfig, translated

PAGE = 512
"""Bytes of a page: the alignment of every write, clear and page range."""
MAX_PUT = 4 * 1024 * 1024
"""Largest ``Put Page`` body Azure accepts (bytes); Azurite accepts more, Azure does not."""

Ranges = list[tuple[int, int]]
"""Allocated ``(start, end)`` byte ranges of a blob, end exclusive, in order."""
T = TypeVar("T")


class PageBlobDevice:
    """A page blob, writable, or one of its snapshots, read-only."""

    def __init__(
        self,
        client: BlobClient,
        config: AzureSiteConfig,
        size: int,
        *,
        writable: bool,
        ranges: Ranges | None = None,
    ) -> None:
        self._client = client
        self._config = config
        self._size = size
        self._writable = writable
        self._ranges = ranges  # Fixed page ranges (a snapshot), None: ask each time.
        self._closed = False

    @classmethod
    def snapshot(cls, client: BlobClient, config: AzureSiteConfig, size: int) -> PageBlobDevice:
        """A read-only device on a snapshot client (its page ranges read once)."""
        device = cls(client, config, size, writable=False)
        device._ranges = device._page_ranges(0, size)
        return device

    @property
    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf))
        end = offset + len(buf)
        pos = offset
        for start, stop in self._allocated(offset, len(buf)):
            buf[pos - offset : start - offset] = bytes(start - pos)  # Fast path: a hole.
            self._download(start, buf[start - offset : stop - offset])
            pos = stop
        buf[pos - offset :] = bytes(end - pos)

    def write(self, offset: int, buf: memoryview) -> None:
        self._check(offset, len(buf), writing=True)
        for start, length, zero in _runs(buf):
            if zero:
                self.zero(offset + start, length)  # Never uploaded: cleared.
                continue
            for piece in range(start, start + length, MAX_PUT):
                chunk = buf[piece : min(piece + MAX_PUT, start + length)]
                self._put(offset + piece, chunk)

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length, writing=True)
        if length:
            self._call("clear pages of", lambda: self._client.clear_page(offset, length))

    def flush(self) -> None:
        self._open()

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        length = self._size - offset if length is None else length
        self._check(offset, length)
        found: list[Extent] = []
        pos = offset
        for start, stop in self._allocated(offset, length):
            if start > pos:
                found.append(Extent(pos, start - pos, zero=True))
            found.append(Extent(start, stop - start))
            pos = stop
        if pos < offset + length:
            found.append(Extent(pos, offset + length - pos, zero=True))
        return merge_touching(found)

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        raise DiskError(detail=f"page blob {self._client.url} has no change tracking")

    def clone(self) -> PageBlobDevice:
        self._open()
        return PageBlobDevice(
            self._client, self._config, self._size, writable=self._writable, ranges=self._ranges
        )

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> PageBlobDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Helpers ------------------------------------------------------------------

    def _allocated(self, offset: int, length: int) -> Ranges:
        """The allocated ranges clipped to ``[offset, offset + length)``."""
        if length == 0:
            return []
        end = offset + length
        ranges = self._ranges if self._ranges is not None else self._page_ranges(offset, length)
        return [(max(s, offset), min(e, end)) for s, e in ranges if s < end and e > offset]

    def _page_ranges(self, offset: int, length: int) -> Ranges:
        start = offset - offset % PAGE
        stop = -(-(offset + length) // PAGE) * PAGE
        listed = self._call(
            "list the page ranges of",
            lambda: list(self._client.list_page_ranges(offset=start, length=stop - start)),
        )
        return [span(r) for r in listed if not r.cleared]

    def _download(self, offset: int, view: memoryview) -> None:
        def fetch() -> None:
            pos = 0
            stream = self._client.download_blob(offset=offset, length=len(view))
            for chunk in stream.chunks():
                view[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
            if pos != len(view):
                raise DiskError(detail=f"short read of {self._client.url} at {offset}")

        self._call("read", fetch)

    def _put(self, offset: int, chunk: memoryview) -> None:
        # The SDK sends the memoryview as it is (no copy of the buffer).
        self._call(
            "write pages of",
            lambda: self._client.upload_page(chunk, offset=offset, length=len(chunk)),  # type: ignore[arg-type]
        )

    def _call(self, what: str, action: Callable[[], T]) -> T:
        with translated(self._config, what, self._client.url):
            return action()

    def _check(self, offset: int, length: int, *, writing: bool = False) -> None:
        self._open()
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DiskError(
                detail=f"range {offset}+{length} is outside {self._client.url} ({self._size} bytes)"
            )
        if not writing:
            return
        if not self._writable:
            raise DiskError(detail=f"{self._client.url} is a sealed point: read-only")
        if offset % PAGE or length % PAGE:
            raise DiskError(
                detail=f"write of {length} bytes at {offset} to page blob {self._client.url} "
                f"is not aligned to {PAGE}-byte pages"
            )

    def _open(self) -> None:
        if self._closed:
            raise DiskError(detail=f"page blob device {self._client.url} is closed")


def span(page_range: PageRange) -> tuple[int, int]:
    """``(start, end)`` of a listed page range, end exclusive (Azure's is inclusive)."""
    return int(page_range.start or 0), int(page_range.end or 0) + 1


def _runs(buf: memoryview) -> Iterator[tuple[int, int, bool]]:
    """``(start, length, zero)`` runs of whole 512-byte pages of ``buf``, in order."""
    if not len(buf):
        return
    words = np.frombuffer(buf, dtype=np.uint64).reshape(-1, PAGE // 8)
    zero = words.max(axis=1) == 0  # Fast path: max vectorises, any() does not.
    edges = np.flatnonzero(np.diff(zero.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(zero)]
    for first, last in itertools.pairwise(bounds):
        yield first * PAGE, (last - first) * PAGE, bool(zero[first])
