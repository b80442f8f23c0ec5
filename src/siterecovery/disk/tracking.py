"""Block access to a VM's disks and their change tracking, as a hypervisor offers it.

The site side of a pass (``sites/local.py``, ``sites/views.py``,
``sites/images.py``) needs four things of a VM's disks, whatever runs the VM:

- read or write a disk (:meth:`DiskAccess.open`, a :class:`BlockDevice`);
- *checkpoints*: named change trackers on every disk, each recording the blocks
  written since it started (:class:`ChangeTracker`);
- a *point-in-time view* of several disks at one instant, taken in the same
  atomic step that starts a new checkpoint and stops the others, whose devices
  report the blocks changed since the checkpoints asked for
  (:meth:`DiskAccess.freeze`, :class:`View`);
- finding a view again after the caller's process restarted, and removing what
  a crashed caller left (``find_view``, ``cleanup_views``).

Two implementations: qemu-storage-daemon (``disk/checkpoints.py``: persistent
dirty bitmaps, image fleecing, NBD exports; the local provider) and libvirt
(``providers/libvirt/tracking.py``: domain checkpoints and pull-mode backups).
Both pass ``tests/providers/test_tracking_contract.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from siterecovery.disk.base import BlockDevice

VIEW_PREFIX = "srv"
"""Names of the parts of a pass's views start with this."""

CHECK_PREFIX = "srk"
"""... and of views that only read (a check), which touch no checkpoint: a
pass's cleanup of its own views leaves them alone."""


@dataclass(frozen=True, slots=True)
class BitmapState:
    """One checkpoint of ours on one disk, as the hypervisor reports it.

    ``count`` is the number of bytes marked since it started (0 when
    inconsistent: its changes are lost, a checksum pass must follow).
    """

    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    count: int


class View(Protocol):
    """A read-only image of one disk at the instant of a freeze; valid,
    whatever the guest writes, until :meth:`release`."""

    @property
    def tag(self) -> str: ...

    @property
    def has_bitmap(self) -> bool:
        """Whether the devices of :meth:`open` report ``dirty_extents``."""
        ...

    def open(self) -> AbstractContextManager[BlockDevice]:
        """A new read-only connection to the view (one per thread), closed on
        exiting it (``with view.open() as device``)."""
        ...

    def release(self) -> None:
        """Tear the view down; checkpoints are untouched. Idempotent."""
        ...


class ChangeTracker(Protocol):
    """The checkpoints and views of one disk. One caller at a time per
    tracker; the trackers of one VM may be used from several threads."""

    def bitmaps(self) -> list[BitmapState]:
        """Our checkpoints on the disk (in no promised order: callers go by name
        and by ``recording``)."""
        ...

    def find_view(self, tag: str) -> View | None:
        """The complete view frozen with ``tag`` (by this process or an earlier
        one), or None."""
        ...

    def drop(self, names: Iterable[str]) -> None:
        """Remove these checkpoints (inconsistent ones too); unknown names are
        ignored. Idempotent."""
        ...

    def ensure_tracking(self, name: str) -> str:
        """Make sure a checkpoint of ours records, adding ``name`` if none
        does; returns the recording one's name."""
        ...

    def cleanup_views(self, keep_tags: Iterable[str] = ()) -> list[str]:
        """Release every view of this tracker's prefix but those of
        ``keep_tags``, with what crashed callers left. Idempotent."""
        ...


class DiskAccess(Protocol):
    """Block access to the disks of one VM, whether it runs or not."""

    @property
    def running(self) -> bool:
        """Whether the guest runs (its disks change while they are read)."""
        ...

    @property
    def key(self) -> str:
        """Names the VM's disk server: callers serialize their reads of one
        server's views by it."""
        ...

    def open(self, disk: str, *, writable: bool = False) -> AbstractContextManager[BlockDevice]:
        """A connection to the disk itself: a stopped VM's (a failback's target,
        a check). A running VM's disks may refuse it (libvirt: they are read
        through a view, :meth:`freeze`)."""
        ...

    def allocated(self, disk: str) -> int:
        """Bytes of the disk that hold data (an estimate's input: a dry run, the
        phase-2 prediction), without reading it."""
        ...

    def trackers(self, *, prefix: str = VIEW_PREFIX) -> dict[str, ChangeTracker]:
        """Each disk's tracker, by disk name in the VM's order; ``prefix``
        keeps kinds of views apart (:data:`VIEW_PREFIX`, :data:`CHECK_PREFIX`)."""
        ...

    def freeze(
        self,
        requests: Sequence[tuple[ChangeTracker, Sequence[str]]],
        tag: str,
        *,
        new_checkpoint: str | None,
        granularity: int | None = None,
    ) -> list[View]:
        """Views of several disks of this VM at one instant, in one atomic step
        with the checkpoints' split: ``new_checkpoint`` starts recording and
        every other checkpoint of ours stops (None: no checkpoint is touched,
        a read-only look; every ``since`` must then be empty).

        Each request is a tracker of this access and the checkpoints whose
        union the view's ``dirty_extents`` report (empty: no bitmap; the
        caller does a full or checksum sync). ``granularity`` (bytes, a power
        of two) of the new checkpoint when what follows must be exact.
        Idempotent by ``tag``: disks already frozen with it are completed and
        returned. Raises BitmapInconsistent for a missing or inconsistent
        checkpoint of a ``since``.
        """
        ...
