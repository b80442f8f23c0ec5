"""A :class:`~siterecovery.disk.base.BlockDevice` over an NBD export (libnbd).

The exports come from qemu-storage-daemon on a unix socket. Reads land directly
in the caller's buffer (``aio_pread`` into a shared ``nbd.Buffer``); requests are
split to the server's maximum (at most 32 MiB). The allocation map comes from
the ``base:allocation`` meta context and the change map from
``qemu:dirty-bitmap:NAME``. ``nbd.Error`` is translated into
:class:`DiskError` here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import nbd

from siterecovery.disk.base import Extent, merge_touching
from siterecovery.domain.errors import DiskError, DiskFull

MAX_REQUEST = 32 * 1024 * 1024
"""Largest read or write sent in one NBD request (bytes)."""

_MAX_ZERO = 1024 * 1024 * 1024
_MAX_STATUS = 1024 * 1024 * 1024
_ALLOCATION = nbd.CONTEXT_BASE_ALLOCATION
_DIRTY_PREFIX = "qemu:dirty-bitmap:"

# (zero, dirty) of an extent from the flags of one meta context.
_Kind = tuple[bool, bool]


@contextmanager
def _translated(what: str, target: str = "") -> Iterator[None]:
    """Translate nbd.Error into DiskError, once, at this boundary (DiskFull
    when a write to ``target`` found no space: the server's ENOSPC)."""
    try:
        yield
    except nbd.Error as e:
        if target and getattr(e, "errno", None) == "ENOSPC":
            raise DiskFull(what=what, where=target) from e
        raise DiskError(detail=f"{what}: {e.string}") from e


def _allocation_kind(flags: int) -> _Kind:
    return bool(flags & nbd.STATE_ZERO), True


def _dirty_kind(flags: int) -> _Kind:
    return False, bool(flags & 1)


class NbdDevice:
    """One NBD connection to one export.

    Not thread-safe: use :meth:`clone` for each worker thread. Every method
    raises :class:`DiskError`; using a closed device raises it too.
    """

    def __init__(
        self, handle: Any, socket_path: Path, export: str, writable: bool, bitmap: str | None
    ) -> None:
        self._h: Any = handle
        self._socket = socket_path
        self._export = export
        self._writable = writable
        self._bitmap = bitmap
        self._size: int = handle.get_size()
        self._max_request = _max_request(handle)

    @classmethod
    def connect(
        cls,
        socket_path: Path | str,
        export: str,
        *,
        writable: bool = False,
        bitmap: str | None = None,
    ) -> NbdDevice:
        """Connect to ``export`` on the unix socket ``socket_path``.

        With ``bitmap``, the export must publish that dirty bitmap, and
        :meth:`dirty_extents` reports it. ``writable`` requires a writable export.
        """
        socket_path = Path(socket_path)
        with _translated(f"cannot connect to NBD export '{export}' at {socket_path}"):
            handle = _open_handle(socket_path, export, bitmap)
        device = cls(handle, socket_path, export, writable, bitmap)
        device._check_negotiated()
        return device

    def _check_negotiated(self) -> None:
        if self._writable and self._h.is_read_only():
            self.close()
            raise DiskError(detail=f"NBD export '{self._export}' is read-only")
        if self._bitmap and not self._h.can_meta_context(_DIRTY_PREFIX + self._bitmap):
            self.close()
            raise DiskError(
                detail=f"NBD export '{self._export}' does not publish bitmap '{self._bitmap}'"
            )

    @property
    def export(self) -> str:
        return self._export

    @property
    def _served_by(self) -> str:
        return f"the image served as NBD export '{self._export}' on {self._socket}"

    @property
    def bitmap(self) -> str | None:
        """The dirty bitmap this device was opened against, if any."""
        return self._bitmap

    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` from ``offset`` (zero-copy, split to the server max)."""
        h = self._handle(offset, len(buf))
        with _translated(f"cannot read NBD export '{self._export}'"):
            for start in range(0, len(buf), self._max_request):
                chunk = buf[start : start + self._max_request]
                cookie = h.aio_pread(nbd.Buffer.from_buffer(chunk), offset + start)
                while not h.aio_command_completed(cookie):
                    h.poll(-1)

    def write(self, offset: int, buf: memoryview) -> None:
        """Write all of ``buf`` at ``offset`` (split to the server max)."""
        h = self._writable_handle(offset, len(buf))
        with _translated(f"a write to NBD export '{self._export}'", self._served_by):
            for start in range(0, len(buf), self._max_request):
                h.pwrite(buf[start : start + self._max_request], offset + start)

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeroes; the server may punch holes."""
        h = self._writable_handle(offset, length)
        if not h.can_zero():
            self._write_zeroes(offset, length)  # Slow path.
            return
        with _translated(f"a zero to NBD export '{self._export}'", self._served_by):
            for start in range(offset, offset + length, _MAX_ZERO):
                h.zero(min(_MAX_ZERO, offset + length - start), start)

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = memoryview(bytes(min(length, self._max_request)))
        for start in range(offset, offset + length, len(zeroes)):
            self.write(start, zeroes[: min(len(zeroes), offset + length - start)])

    def flush(self) -> None:
        """Ask the server to make completed writes durable. Idempotent."""
        h = self._handle(0, 0)
        if h.can_flush():
            with _translated(f"a flush of NBD export '{self._export}'", self._served_by):
                h.flush()

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Allocation map from ``base:allocation``; ``zero`` when the server says so."""
        end = self._end_of(offset, length)
        if not self._h.can_meta_context(_ALLOCATION):
            return iter([Extent(offset, end - offset, zero=False)])
        return merge_touching(self._statuses(_ALLOCATION, offset, end, _allocation_kind))

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Change map from the dirty bitmap; ``zero`` is always false here."""
        end = self._end_of(offset, length)
        if self._bitmap is None:
            raise DiskError(detail=f"NBD export '{self._export}' was opened without a dirty bitmap")
        context = _DIRTY_PREFIX + self._bitmap
        return merge_touching(self._statuses(context, offset, end, _dirty_kind))

    def _statuses(
        self, context: str, pos: int, end: int, kind: Callable[[int], _Kind]
    ) -> Iterator[Extent]:
        """Extents of one meta context, block_status looped until ``end`` is covered."""
        while pos < end:
            entries = self._block_status(context, pos, end)
            for length, flags in zip(entries[::2], entries[1::2], strict=True):
                length = min(length, end - pos)
                zero, dirty = kind(flags)
                yield Extent(pos, length, zero=zero, dirty=dirty)
                pos += length
                if pos >= end:
                    break

    def _block_status(self, context: str, pos: int, end: int) -> list[int]:
        found: list[int] = []

        def collect(metacontext: str, offset: int, entries: list[int], err: int) -> int:
            if metacontext == context:
                found.extend(entries)
            return 0

        h = self._handle(pos, 0)
        with _translated(f"cannot get block status of NBD export '{self._export}'"):
            h.block_status(min(end - pos, _MAX_STATUS), pos, collect)
        if not found or any(n <= 0 for n in found[::2]):
            raise DiskError(detail=f"NBD server sent no usable '{context}' status at {pos}")
        return found

    def clone(self) -> NbdDevice:
        """A new connection with the same export, mode and bitmap."""
        return NbdDevice.connect(
            self._socket, self._export, writable=self._writable, bitmap=self._bitmap
        )

    def close(self) -> None:
        """Disconnect. Idempotent; a dead server is not an error here."""
        h, self._h = self._h, None
        if h is None:
            return
        with suppress(nbd.Error):  # The connection is gone either way.
            h.shutdown()

    def __enter__(self) -> NbdDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _end_of(self, offset: int, length: int | None) -> int:
        length = self._size - offset if length is None else length
        self._handle(offset, length)
        return offset + length

    def _writable_handle(self, offset: int, length: int) -> Any:
        if not self._writable:
            raise DiskError(detail=f"NBD export '{self._export}' is opened read-only")
        return self._handle(offset, length)

    def _handle(self, offset: int, length: int) -> Any:
        if self._h is None:
            raise DiskError(detail=f"NBD export '{self._export}' is closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DiskError(
                detail=f"range {offset}+{length} is outside NBD export "
                f"'{self._export}' (size {self._size})"
            )
        return self._h


def _open_handle(socket_path: Path, export: str, bitmap: str | None) -> Any:
    handle = nbd.NBD()
    handle.set_export_name(export)
    handle.add_meta_context(_ALLOCATION)
    if bitmap:
        handle.add_meta_context(_DIRTY_PREFIX + bitmap)
    handle.connect_unix(str(socket_path))
    return handle


def _max_request(handle: Any) -> int:
    """The largest request the server takes, capped at :data:`MAX_REQUEST`."""
    try:
        server_max = int(handle.get_block_size(nbd.SIZE_MAXIMUM))
    except (nbd.Error, AttributeError):
        server_max = 0
    return min(MAX_REQUEST, server_max) if server_max > 0 else MAX_REQUEST
