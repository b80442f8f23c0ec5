"""The frames a sender sent and its receiver has not answered yet.

A :class:`Window` holds them in ``seq`` order, each with what it takes to
encode it again: on a NAK (go-back-N, the same ``seq``) or on a new
connection (new numbers). It owns their payloads: the data of a DATA frame
is copied into a buffer of the window's pool (the caller reuses its buffer as
soon as ``write`` returns), and the buffer goes back to the pool when the
frame is acknowledged. At most ``frames`` buffers exist per window, so a
connection holds at most about ``max_bytes`` of payload, whatever is in flight.

Not thread-safe: the device that owns it locks around it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from siterecovery.wire.frames import Kind

WINDOWED = (Kind.DATA, Kind.ZERO)
"""Kinds sent without waiting for their answer; every other request drains the window."""


@dataclass(slots=True)
class Pending:
    """One request sent (or about to be) and not answered yet.

    ``seq`` is its number on the current connection (0: not sent on it yet);
    ``tries`` counts its resends there (NAKs and damaged replies).
    """

    kind: Kind
    offset: int
    length: int
    parts: tuple[bytes | memoryview, ...] = ()
    compress: bool = False
    size: int = 0
    """Data bytes it holds (counted against ``max_bytes``)."""
    buf: bytearray | None = None
    seq: int = 0
    tries: int = 0
    answered: bool = False

    @property
    def windowed(self) -> bool:
        return self.kind in WINDOWED


class Window:
    """Unanswered frames in ``seq`` order, at most ``frames`` of them and ``max_bytes`` of data
    (or one frame of any size)."""

    def __init__(self, frames: int, max_bytes: int) -> None:
        if frames < 1:
            raise ValueError(f"a window of {frames} frames")
        self.frames = frames
        self.max_bytes = max_bytes
        self._pending: deque[Pending] = deque()
        self._bytes = 0
        self._free: list[bytearray] = []

    def __len__(self) -> int:
        return len(self._pending)

    def __iter__(self) -> Iterator[Pending]:
        return iter(self._pending)

    @property
    def nbytes(self) -> int:
        """Data bytes held by unanswered frames."""
        return self._bytes

    @property
    def oldest(self) -> Pending | None:
        return self._pending[0] if self._pending else None

    def full(self, adding: int) -> bool:
        """Whether a frame of ``adding`` payload bytes must wait (an empty window takes any)."""
        if not self._pending:
            return False
        return len(self._pending) >= self.frames or self._bytes + adding > self.max_bytes

    def add(self, pending: Pending) -> None:
        self._pending.append(pending)
        self._bytes += pending.size

    def copy(
        self, view: memoryview, segments: Sequence[tuple[int, int, bool]]
    ) -> tuple[memoryview | None, bytearray | None]:
        """The data segments of ``view``, in order, copied into a pooled buffer
        (give the buffer to the frame's :class:`Pending`: it returns on retiring)."""
        total = sum(n for _, n, zero in segments if not zero)
        if not total:
            return None, None
        buf = self._take(total)
        into, pos = memoryview(buf), 0
        for start, length, zero in segments:
            if not zero:
                into[pos : pos + length] = view[start : start + length]
                pos += length
        return into[:total], buf

    def _take(self, size: int) -> bytearray:
        while self._free:
            buf = self._free.pop()
            if len(buf) >= size:
                return buf  # Fast path: the last chunks had this size.
        return bytearray(size)

    def retire_through(self, seq: int) -> bool:
        """Forget every frame up to ``seq`` (answered); whether any was."""
        retired = False
        while self._pending and 0 < self._pending[0].seq <= seq:
            self._retire(self._pending.popleft())
            retired = True
        return retired

    def retire_oldest(self) -> Pending:
        pending = self._pending.popleft()
        self._retire(pending)
        return pending

    def _retire(self, pending: Pending) -> None:
        pending.answered = True
        self._bytes -= pending.size
        if pending.buf is not None and len(self._free) < self.frames:
            self._free.append(pending.buf)
        pending.buf, pending.parts = None, ()

    def stale(self, seq: int) -> bool:
        """Whether an answer to ``seq`` is about a frame already answered."""
        oldest = self.oldest
        return oldest is None or seq < oldest.seq

    def unsent(self) -> list[Pending]:
        return [p for p in self._pending if not p.seq]

    def renumber(self) -> None:
        """A new connection: every frame is to be sent again, under new numbers."""
        for pending in self._pending:
            pending.seq = pending.tries = 0

    def clear(self) -> None:
        """Forget every frame (the device gave up): their answers will never come."""
        while self._pending:
            self._retire(self._pending.popleft())
