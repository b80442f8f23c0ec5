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
    exact: however many threads take from one bucket, the bytes of the takes
    that have returned ``t`` seconds after its creation never exceed
    ``burst + rate × t`` (at a constant rate). The
    sleep is cut into slices of at most :data:`SLICE` seconds; ``interrupt``
    (a sync's cancel check: the bucket's own, or one given to :meth:`take` by
    each of the transfers sharing it) is called between slices: when it
    returns True or raises, the caller stops waiting at once, so a low cap
    never delays a cancel by more than a slice.

    :meth:`set_rate` changes the rate while takers wait (a site's cap, set by
    its latest transfer); rate 0 lifts the cap. ``clock`` and ``sleep`` are
    :func:`time.monotonic` and :func:`time.sleep` but for tests.
    """

    SLICE = 0.2

    def __init__(
        self,
        rate: int,
        burst: int,
        *,
        interrupt: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise InvalidInput(field="bytes_per_second", reason=f"{rate}/{burst} is not positive")
        self._rate = rate
        self._burst = burst
        self._interrupt = interrupt
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._stamp = clock()
        self._lock = threading.Lock()

    @property
    def rate(self) -> int:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def set_rate(self, rate: int, burst: int | None = None) -> None:
        """From now on ``rate`` bytes/s (0: no cap) and ``burst`` (default a
        quarter second of the rate); the tokens saved so far are kept, up to
        the new burst, and a debt stays a debt."""
        if rate < 0 or (burst is not None and burst <= 0):
            raise InvalidInput(field="bytes_per_second", reason=f"{rate}/{burst} is not valid")
        with self._lock:
            self._refill(self._clock())
            self._rate = rate
            self._burst = burst or default_burst(rate) or self._burst
            self._tokens = min(self._tokens, float(self._burst))

    def take(self, nbytes: int, interrupt: Callable[[], bool] | None = None) -> float:
        """Spend ``nbytes`` tokens, sleeping while the bucket is in debt; the
        seconds slept. ``interrupt``: this caller's, instead of the bucket's."""
        wait = self.debit(nbytes)
        if wait <= 0:
            return 0.0
        check = interrupt or self._interrupt
        start = self._clock()
        if check is None:
            self._sleep(wait)
            return self._clock() - start
        deadline = start + wait
        while (left := deadline - self._clock()) > 0:
            self._sleep(min(left, self.SLICE))
            if check():
                break
        return self._clock() - start

    def debit(self, nbytes: int) -> float:
        """Spend ``nbytes`` tokens now; returns the seconds the caller must wait."""
        with self._lock:
            self._refill(self._clock())
            if self._rate == 0:
                return 0.0
            self._tokens -= nbytes
            return max(0.0, -self._tokens / self._rate)

    def _refill(self, now: float) -> None:
        """The tokens earned since the last stamp, at the current rate (lock held)."""
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(float(self._burst), self._tokens + elapsed * self._rate)
        self._stamp = now


def default_burst(rate: int) -> int:
    """The burst of a cap of ``rate`` bytes/s: a quarter second of it (0 for none)."""
    return rate // 4 or (1 if rate > 0 else 0)


class _Waited:
    """Seconds the takers of a RateLimitedDevice and its clones slept. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = 0.0

    def add(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._seconds += seconds

    @property
    def seconds(self) -> float:
        with self._lock:
            return self._seconds


class RateLimitedDevice:
    """Limits the bytes read plus written through it and all its clones.

    Used for replication bandwidth limits. ``zero`` moves no data and is not
    limited. The limit applies before each request, so a request of any size
    passes and the caller then waits for its bytes. Contents are unchanged.

    ``bucket``: a bucket to share with other devices (a site's cap shared by
    every transfer it sends), then ``bytes_per_second`` is ignored;
    ``interrupt`` is this device's cancel check (its clones' too).
    :attr:`waited_seconds` is what this device and its clones slept on the
    bucket, not what other devices sharing it slept.
    """

    def __init__(
        self,
        inner: BlockDevice,
        bytes_per_second: int,
        *,
        burst: int | None = None,
        bucket: TokenBucket | None = None,
        interrupt: Callable[[], bool] | None = None,
        waited: _Waited | None = None,
    ) -> None:
        self._inner = inner
        self._bucket = bucket or TokenBucket(
            bytes_per_second, burst or default_burst(bytes_per_second) or 1
        )
        self._interrupt = interrupt
        self._waited = waited or _Waited()

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
    def waited_seconds(self) -> float:
        """Seconds this device and its clones slept on the bucket (summed over
        threads: two clones sleeping one second at once count two)."""
        return self._waited.seconds

    @property
    def size(self) -> int:
        return self._inner.size

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._waited.add(self._bucket.take(len(buf), self._interrupt))
        self._inner.readinto(offset, buf)

    def write(self, offset: int, buf: memoryview) -> None:
        self._waited.add(self._bucket.take(len(buf), self._interrupt))
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
        return RateLimitedDevice(
            self._inner.clone(), self._bucket.rate, bucket=self._bucket,
            interrupt=self._interrupt, waited=self._waited,
        )  # fmt: skip

    def close(self) -> None:
        self._inner.close()
