"""The staged executor of a sync: readers, a bounded queue, writers.

::

    items ──> readers ───── bounded queue of filled buffers ─────> writers ──> tally
              own src clone; a buffer from the pool;               own sink (a dst
              read; split into zero and data segments              clone: a file, an
              (numpy, one call per chunk)                          NBD or a wire
                                                                   connection); give
                                                                   the buffer back

* Memory is bounded: ``readers + writers + 1`` buffers of ``chunk_size`` bytes
  circulate; a reader waits for a free one, the queue holds at most as many
  chunks as there are buffers (plus zero items, which carry none).
* Taking an item is where readers synchronise and where ``cancelled()`` is
  polled. Items carry a sequence number: the :class:`Tally` turns finished
  items into a contiguous watermark, the safe resume offset after a flush.
* The first error stops the readers; writers drain the queue (discarding what
  they would have written) so every thread ends; :meth:`Pipeline.execute`
  joins them all and re-raises the first error.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from siterecovery.disk.base import BlockDevice, EarlyWriteback, Extent
from siterecovery.domain.errors import SyncCancelled

Segments = Sequence[tuple[int, int, bool]]
"""``(start, length, zero)`` runs of a chunk; ``start`` relative to the chunk."""

Progress = Callable[[int, int], None]
Checkpoint = Callable[[int], None]
Cancelled = Callable[[], bool]


class Sink(Protocol):
    """Where one writer's segments go. Not thread-safe: one per writer.

    A block device is a sink; a wire connection is one too.
    """

    def write(self, offset: int, buf: memoryview) -> None:
        """Store all of ``buf`` at ``offset``; ``buf`` is reused after the call."""
        ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeroes (no data moves)."""
        ...

    def flush(self) -> None:
        """Make durable every completed write of *every* sink of the same target."""
        ...

    def close(self) -> None:
        """Release the sink. Idempotent."""
        ...


@runtime_checkable
class SegmentSink(Protocol):
    """A sink that takes a whole chunk in one call (one wire frame, one reply)."""

    def write_segments(self, offset: int, view: memoryview, segments: Segments) -> None:
        """Write the data segments of ``view`` and zero its zero segments.

        ``view`` was read at disk ``offset``; it is reused after the call.
        """
        ...


def segments(view: memoryview, offset: int, grain: int) -> list[tuple[int, int, bool]]:
    """``(start, length, zero)`` runs of ``view`` (read at disk ``offset``).

    Zero is decided per ``grain``-aligned block (in disk offsets); adjacent
    blocks of the same kind form one run. One numpy reduction covers all
    whole blocks (about 90 GB/s); the partial ones at either end are scanned
    alone.
    """
    runs: list[tuple[int, int, bool]] = []
    for start, length, zero in _blocks(view, offset, grain):
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, zero)
        else:
            runs.append((start, length, zero))
    return runs


def _blocks(view: memoryview, offset: int, grain: int) -> Iterator[tuple[int, int, bool]]:
    head = min(len(view), -offset % grain)
    body = (len(view) - head) // grain * grain
    if head:
        yield 0, head, _is_zero(view[:head])
    if body:
        zero = _zero_rows(view[head : head + body], grain)
        for index, flag in enumerate(zero.tolist()):
            yield head + index * grain, grain, flag
    if head + body < len(view):
        yield head + body, len(view) - head - body, _is_zero(view[head + body :])


def _zero_rows(view: memoryview, grain: int) -> npt.NDArray[np.bool_]:
    """Per ``grain`` block of ``view`` (a whole number of them): all zero?"""
    if grain % 8 == 0:
        words = np.frombuffer(view, dtype=np.uint64).reshape(-1, grain // 8)
        return np.asarray(words.max(axis=1) == 0)  # Fast path: max vectorises, any() does not.
    rows = np.frombuffer(view, dtype=np.uint8).reshape(-1, grain)
    return np.asarray(~rows.any(axis=1))


def _is_zero(view: memoryview) -> bool:
    return not np.frombuffer(view, dtype=np.uint8).any()


# Progress, watermark and checkpoints.


class Tally:
    """Progress, the watermark and the checkpoints of one sync. Thread-safe.

    Intermediate checkpoints happen only when a ``checkpoint`` callback is
    given (each one costs a flush); :meth:`save` with an explicit offset is
    the final one.
    """

    def __init__(
        self,
        start: int,
        progress: Progress | None,
        checkpoint: Checkpoint | None,
        every: int,
        *,
        flush: bool = True,
    ) -> None:
        self._lock = threading.Lock()
        self._progress = progress
        self._checkpoint = checkpoint
        self._every = every
        self._flush = flush
        self._done = 0
        self._total = 0
        self._finished: dict[int, int] = {}
        self._next_seq = 0
        self._watermark = start
        self._saved = start
        self._copied = 0
        self._copied_at_save = 0
        self._saving = threading.Lock()

    @property
    def done(self) -> int:
        return self._done

    @property
    def saved(self) -> int:
        """The last offset passed to ``checkpoint`` (the start before any)."""
        return self._saved

    def add_total(self, nbytes: int) -> None:
        with self._lock:
            self._total += nbytes
            self._report()

    def read(self, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes
            self._report()

    def _report(self) -> None:
        if self._progress is not None:
            self._progress(self._done, self._total)

    def finish(self, seq: int, end: int, nbytes: int) -> bool:
        """Item ``seq`` (ending at ``end``) is done after reading ``nbytes``.

        Returns whether a checkpoint is due.
        """
        with self._lock:
            self._finished[seq] = end
            while self._next_seq in self._finished:
                self._watermark = self._finished.pop(self._next_seq)
                self._next_seq += 1
            self._done += nbytes
            self._copied += nbytes
            self._report()
            due = self._copied - self._copied_at_save >= self._every
            return due and self._checkpoint is not None

    def save(self, sink: Sink, offset: int | None = None) -> None:
        """Flush ``sink`` and checkpoint the watermark (or ``offset``, when all is done).

        Skipped when another thread is saving (it will), or nothing new is done.
        """
        if not self._saving.acquire(blocking=False):
            return
        try:
            with self._lock:
                target = self._watermark if offset is None else offset
                copied = self._copied
            if target > self._saved:
                if self._flush:
                    sink.flush()
                if self._checkpoint is not None:
                    self._checkpoint(target)
                self._saved, self._copied_at_save = target, copied
        finally:
            self._saving.release()


# The stages.


@dataclass(slots=True)
class Stats:
    """Bytes moved (per writer, summed at the end); ``chunks`` changed something."""

    read: int = 0
    written: int = 0
    zeroed: int = 0
    chunks: int = 0

    def add(self, other: Stats) -> None:
        self.read += other.read
        self.written += other.written
        self.zeroed += other.zeroed
        self.chunks += other.chunks


@dataclass(frozen=True, slots=True)
class Stage:
    """How a pipeline runs: workers per stage, buffer and zero-detection sizes."""

    readers: int
    writers: int
    chunk_size: int
    grain: int
    target_is_blank: bool
    early_writeback: bool = False
    """Start each write's writeback at once (a durable sync: see EarlyWriteback)."""


@dataclass(frozen=True, slots=True)
class _Chunk:
    seq: int
    item: Extent
    buf: memoryview | None
    segments: Segments


_DONE = None


class Pipeline:
    """The readers and writers of one sync and what they share."""

    def __init__(
        self,
        src: BlockDevice,
        dst: BlockDevice,
        stage: Stage,
        items: Iterator[Extent],
        tally: Tally,
        cancelled: Cancelled | None,
    ) -> None:
        self._src = src
        self._dst = dst
        self._stage = stage
        self._items = enumerate(items)
        self._tally = tally
        self._cancelled = cancelled
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._stopped = False
        self._stats = Stats()
        buffers = stage.readers + stage.writers + 1
        self._pool: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(buffers):
            self._pool.put(memoryview(bytearray(stage.chunk_size)))
        self._queue: queue.Queue[_Chunk | None] = queue.Queue(maxsize=buffers)
        self._readers_left = stage.readers

    def execute(self, *, what: str = "sync") -> Stats:
        """Run every stage, join all threads; raise the first error, then SyncCancelled
        (``what`` names the operation in it, with the last checkpoint as ``resume_offset``)."""
        threads = [
            threading.Thread(target=self._read, name=f"sync-read-{i}")
            for i in range(self._stage.readers)
        ] + [
            threading.Thread(target=self._write, name=f"sync-write-{i}")
            for i in range(self._stage.writers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        if self._stopped:
            self._tally.save(self._dst)
            raise SyncCancelled(what=what, resume_offset=self._tally.saved)
        return self._stats

    @property
    def failed(self) -> bool:
        return bool(self._errors)

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self._errors.append(error)

    def _take(self) -> tuple[int, Extent] | None:
        """The next item and its sequence number; None when done, failed or cancelled."""
        with self._lock:
            if self._errors or self._stopped:
                return None
            if self._cancelled is not None and self._cancelled():
                self._stopped = True
                return None
            return next(self._items, None)

    # Readers.

    def _read(self) -> None:
        try:
            src = self._src.clone()
            try:
                self._read_items(src)
            finally:
                src.close()
        except BaseException as e:
            self._fail(e)
        finally:
            self._reader_done()

    def _read_items(self, src: BlockDevice) -> None:
        while (taken := self._take()) is not None:
            seq, item = taken
            if item.zero:
                self._queue.put(_Chunk(seq, item, None, ()))  # Fast path.
                continue
            buf = self._pool.get()  # Slow path.
            try:
                view = buf[: item.length]
                src.readinto(item.start, view)
                found = segments(view, item.start, self._stage.grain)
            except BaseException:
                self._pool.put(buf)
                raise
            self._queue.put(_Chunk(seq, item, buf, found))

    def _reader_done(self) -> None:
        with self._lock:
            self._readers_left -= 1
            last = self._readers_left == 0
        if last:
            for _ in range(self._stage.writers):
                self._queue.put(_DONE)

    # Writers.

    def _write(self) -> None:
        sink: BlockDevice | None = None
        try:
            sink = self._dst.clone()
        except BaseException as e:
            self._fail(e)
        stats = Stats()
        while (chunk := self._queue.get()) is not _DONE:
            if sink is not None and not self.failed:
                try:
                    self._apply(sink, chunk, stats)
                except BaseException as e:
                    self._fail(e)
            if chunk.buf is not None:
                self._pool.put(chunk.buf)
        self._close(sink)
        with self._lock:
            self._stats.add(stats)

    def _apply(self, sink: BlockDevice, chunk: _Chunk, stats: Stats) -> None:
        item = chunk.item
        moved = stats.written + stats.zeroed
        if chunk.buf is None:
            if not self._stage.target_is_blank:
                sink.zero(item.start, item.length)
                stats.zeroed += item.length
        else:
            stats.read += item.length
            self._store(sink, chunk, stats)
        if stats.written + stats.zeroed > moved:
            stats.chunks += 1
        if self._tally.finish(chunk.seq, item.end, item.length if chunk.buf else 0):
            self._tally.save(sink)

    def _store(self, sink: BlockDevice, chunk: _Chunk, stats: Stats) -> None:
        assert chunk.buf is not None
        view, offset = chunk.buf[: chunk.item.length], chunk.item.start
        blank = self._stage.target_is_blank
        wanted = [s for s in chunk.segments if not (s[2] and blank)]
        stats.written += sum(length for _, length, zero in wanted if not zero)
        stats.zeroed += sum(length for _, length, zero in wanted if zero)
        if isinstance(sink, SegmentSink):
            if wanted:
                sink.write_segments(offset, view, wanted)  # One frame per chunk.
            return
        for start, length, zero in wanted:
            if zero:
                sink.zero(offset + start, length)
            else:
                sink.write(offset + start, view[start : start + length])
        if self._stage.early_writeback and isinstance(sink, EarlyWriteback):
            sink.start_writeback(offset, len(view))

    def _close(self, sink: BlockDevice | None) -> None:
        if sink is None:
            return
        try:
            sink.close()
        except BaseException as e:
            self._fail(e)
