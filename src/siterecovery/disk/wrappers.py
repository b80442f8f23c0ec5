"""Cross-cutting behaviour as :class:`~siterecovery.disk.base.BlockDevice` wrappers.

Each wrapper implements the whole protocol by delegating to the device it wraps
and adds one concern. Clones of a wrapper wrap clones of the inner device and
share the wrapper's state (counters, token bucket), so a sync running on
several threads is counted and limited as one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from siterecovery.disk.base import BlockDevice, Extent
from siterecovery.domain.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class IoCounts:
    """What went through a :class:`CountingDevice` and its clones.

    ``bytes_*`` are byte counts; ``reads``, ``writes`` and ``zeroes`` count
    the successful calls.
    """

    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    reads: int = 0
    writes: int = 0
    zeroes: int = 0


class _Counters:
    """Thread-safe counters shared by a CountingDevice and its clones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes = {"read": 0, "written": 0, "zeroed": 0}
        self._calls = {"read": 0, "written": 0, "zeroed": 0}

    def add(self, kind: str, nbytes: int) -> None:
        with self._lock:
            self._bytes[kind] += nbytes
            self._calls[kind] += 1

    def snapshot(self) -> IoCounts:
        with self._lock:
            b, c = self._bytes, self._calls
            return IoCounts(
                b["read"], b["written"], b["zeroed"], c["read"], c["written"], c["zeroed"]
            )


class CountingDevice:
    """Counts the bytes read, written and zeroed through it and all its clones.

    Counting is thread-safe; the device itself is as thread-safe as the one it
    wraps (that is: use :meth:`clone` per thread). Failed calls are not counted.
    """

    def __init__(self, inner: BlockDevice, counters: _Counters | None = None) -> None:
        self._inner = inner
        self._counters = counters or _Counters()

    @property
    def inner(self) -> BlockDevice:
        return self._inner

    @property
    def counts(self) -> IoCounts:
        """A consistent snapshot of the shared counters."""
        return self._counters.snapshot()

    @property
    def size(self) -> int:
        return self._inner.size

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._inner.readinto(offset, buf)
        self._counters.add("read", len(buf))

    def write(self, offset: int, buf: memoryview) -> None:
        self._inner.write(offset, buf)
        self._counters.add("written", len(buf))

    def zero(self, offset: int, length: int) -> None:
        self._inner.zero(offset, length)
        self._counters.add("zeroed", length)

    def flush(self) -> None:
        self._inner.flush()

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        return self._inner.extents(offset, length)

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        return self._inner.dirty_extents(offset, length)

    def clone(self) -> CountingDevice:
        """A clone of the inner device, counted in the same counters."""
        return CountingDevice(self._inner.clone(), self._counters)

    def close(self) -> None:
        self._inner.close()


class TokenBucket:
    """A thread-safe token bucket: ``rate`` bytes per second, ``burst`` at most saved.

    :meth:`take` lets a request through at once and makes the caller sleep off
    the debt, so requests larger than ``burst`` work and the long-run rate is
    exact. The sleep is cut into slices of at most :data:`SLICE` seconds;
    ``interrupt`` (a sync's cancel check) is called between slices: when it
    returns True or raises, the caller stops waiting at once, so a low cap never
    delays a cancel by more than a slice.
    """

    SLICE = 0.2

    def __init__(
        self, rate: int, burst: int, *, interrupt: Callable[[], bool] | None = None
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise InvalidInput(field="bytes_per_second", reason=f"{rate}/{burst} is not positive")
        self._rate = rate
        self._burst = burst
        self._interrupt = interrupt
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    @property
    def rate(self) -> int:
        return self._rate

    def take(self, nbytes: int) -> None:
        """Spend ``nbytes`` tokens, sleeping while the bucket is in debt."""
        wait = self.debit(nbytes)
        if self._interrupt is None:
            time.sleep(wait)
            return
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, self.SLICE))
            if self._interrupt():
                return

    def debit(self, nbytes: int) -> float:
        """Spend ``nbytes`` tokens now; returns the seconds the caller must wait."""
        with self._lock:
            now = time.monotonic()
            elapsed = now - self._stamp
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate) - nbytes
            self._stamp = now
            return max(0.0, -self._tokens / self._rate)


class RateLimitedDevice:
    """Limits the bytes read plus written through it and all its clones.

    Used for replication bandwidth limits. ``zero`` moves no data and is not
    limited. The limit applies before each request, so a request of any size
    passes and the caller then waits for its bytes. Contents are unchanged.
    """

    def __init__(
        self,
        inner: BlockDevice,
        bytes_per_second: int,
        *,
        burst: int | None = None,
        bucket: TokenBucket | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> None:
        self._inner = inner
        self._bucket = bucket or TokenBucket(
            bytes_per_second, burst or bytes_per_second // 4 or 1, interrupt=interrupt
        )

    @property
    def inner(self) -> BlockDevice:
        return self._inner

    @property
    def bucket(self) -> TokenBucket:
        """The token bucket shared with every clone."""
        return self._bucket

    @property
    def bytes_per_second(self) -> int:
        return self._bucket.rate

    @property
    def size(self) -> int:
        return self._inner.size

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._bucket.take(len(buf))
        self._inner.readinto(offset, buf)

    def write(self, offset: int, buf: memoryview) -> None:
        self._bucket.take(len(buf))
        self._inner.write(offset, buf)

    def zero(self, offset: int, length: int) -> None:
        self._inner.zero(offset, length)

    def flush(self) -> None:
        self._inner.flush()

    def extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        return self._inner.extents(offset, length)

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        return self._inner.dirty_extents(offset, length)

    def clone(self) -> RateLimitedDevice:
        """A clone of the inner device sharing this device's token bucket."""
        return RateLimitedDevice(self._inner.clone(), self._bucket.rate, bucket=self._bucket)

    def close(self) -> None:
        self._inner.close()
