"""A :class:`~siterecovery.disk.base.BlockDevice` over a raw image file.

Reads and writes go straight into the caller's buffers with ``os.preadv`` /
``os.pwritev`` (looping on short I/O); the allocation map comes from
``SEEK_DATA``/``SEEK_HOLE``; :meth:`FileDevice.zero` punches holes. A raw file
has no change tracking, so :meth:`FileDevice.dirty_extents` always refuses.
Works on block devices too (their size comes from ``SEEK_END``).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from siterecovery.disk.base import Extent
from siterecovery.domain.errors import DiskError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1024 * 1024
_ZEROES = bytes(_ZERO_CHUNK)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
_SYNC_FILE_RANGE_WRITE = 0x02


@contextmanager
def _translated(what: str, path: Path) -> Iterator[None]:
    """Translate OSError into DiskError, once, at this boundary."""
    try:
        yield
    except OSError as e:
        raise DiskError(detail=f"{what} {path}: {e.strerror or e}") from e


def create_raw(path: Path, size: int) -> None:
    """Create a sparse raw image of ``size`` bytes (all holes).

    Replaces any existing file at ``path``.
    """
    with _translated("cannot create", path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)


class FileDevice:
    """A raw image file (or a block device) opened for block I/O.

    Not thread-safe: use :meth:`clone` for each worker thread. Every method
    raises :class:`DiskError`; using a closed device raises it too.
    """

    def __init__(self, fd: int, path: Path, size: int, writable: bool) -> None:
        self._fd = fd
        self._path = path
        self._size = size
        self._writable = writable

    @classmethod
    def open(cls, path: Path | str, *, writable: bool = False) -> FileDevice:
        """Open ``path``; read-only unless ``writable``."""
        path = Path(path)
        flags = os.O_RDWR if writable else os.O_RDONLY
        with _translated("cannot open", path):
            fd = os.open(path, flags)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
            except OSError:
                os.close(fd)
                raise
        return cls(fd, path, size, writable)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def size(self) -> int:
        """Virtual size in bytes (the file size when opened)."""
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill all of ``buf`` from ``offset``; past ``size`` raises DiskError."""
        self._check_range(offset, len(buf))
        done = 0
        with _translated("cannot read", self._path):
            while done < len(buf):
                n = os.preadv(self._fd, [buf[done:]], offset + done)
                if n == 0:
                    raise DiskError(detail=f"unexpected end of file in {self._path}")
                done += n

    def write(self, offset: int, buf: memoryview) -> None:
        """Write all of ``buf`` at ``offset``; the file never grows."""
        self._check_writable()
        self._check_range(offset, len(buf))
        done = 0
        with _translated("cannot write", self._path):
            while done < len(buf):
                done += os.pwritev(self._fd, [buf[done:]], offset + done)

    def zero(self, offset: int, length: int) -> None:
        """Punch a hole over the range; write zeroes where punching is refused."""
        self._check_writable()
        self._check_range(offset, length)
        if length == 0:
            return
        mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
        if _fallocate(self._fd, mode, offset, length) == 0:
            return  # Fast path.
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV, errno.EINVAL):
            raise DiskError(detail=f"cannot zero {self._path}: {os.strerror(err)}")
        self._write_zeroes(offset, length)  # Slow path.

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = memoryview(_ZEROES)
        end = offset + length
        while offset < end:
            step = min(_ZERO_CHUNK, end - offset)
            self.write(offset, zeroes[:step])
            offset += step

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writeback of the range's dirty pages (``sync_file_range``, no wait).

        A durable sync of 2 GiB made this way finished 20% sooner than writing
        everything and then fsyncing (docs/PERFORMANCE.md). Errors are left to
        :meth:`flush`, which reports them.
        """
        _sync_file_range(self._fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def flush(self) -> None:
        """fsync the file. Idempotent."""
        with _translated("cannot flush", self._path):
            os.fsync(self._fd)

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Data and hole extents from SEEK_DATA/SEEK_HOLE; holes have ``zero=True``.

        Where the file system cannot tell, the whole range is one data extent.
        """
        end = self._end_of(offset, length)
        return self._scan(offset, end)

    def _scan(self, pos: int, end: int) -> Iterator[Extent]:
        with _translated("cannot map", self._path):
            yield from self._scan_raw(pos, end)

    def _scan_raw(self, pos: int, end: int) -> Iterator[Extent]:
        while pos < end:
            data = min(self._seek(pos, os.SEEK_DATA, end), end)
            if data > pos:
                yield Extent(pos, data - pos, zero=True)
            if data >= end:
                return
            hole = min(self._seek(data, os.SEEK_HOLE, end), end)
            yield Extent(data, hole - data, zero=False)
            pos = hole

    def _seek(self, pos: int, whence: int, end: int) -> int:
        """lseek for data or hole; ENXIO (no more data) means the end."""
        try:
            return os.lseek(self._fd, pos, whence)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return end
            if e.errno == errno.EINVAL and whence == os.SEEK_DATA:
                return pos  # Not supported: everything is data.
            if e.errno == errno.EINVAL:
                return end
            raise

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """Always raises DiskError: a raw file has no change tracking."""
        raise DiskError(detail=f"{self._path} is a raw file: it has no change tracking")

    def clone(self) -> FileDevice:
        """Reopen the same file with the same mode."""
        return FileDevice.open(self._path, writable=self._writable)

    def close(self) -> None:
        """Close the file descriptor. Idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with _translated("cannot close", self._path):
                os.close(fd)

    def __enter__(self) -> FileDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _end_of(self, offset: int, length: int | None) -> int:
        length = self._size - offset if length is None else length
        self._check_range(offset, length)
        return offset + length

    def _check_range(self, offset: int, length: int) -> None:
        if self._fd < 0:
            raise DiskError(detail=f"{self._path} is closed")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise DiskError(
                detail=f"range {offset}+{length} is outside {self._path} (size {self._size})"
            )

    def _check_writable(self) -> None:
        if not self._writable:
            raise DiskError(detail=f"{self._path} is opened read-only")
