"""The replica store interface: where a site keeps the recovery-point chains.

A chain is the sequence of sealed points of one disk of one item, oldest
first; a point is named by its file (``p000003.qcow2`` for the local store,
a snapshot id for a blob store) and read as the disk's whole image at that
point. Nothing in this interface is a path the caller could open itself:
it hands out :class:`~siterecovery.disk.base.BlockDevice` objects, so the
store may live in another process, on another machine or in a storage
account. Implementations are registered per provider
(:data:`siterecovery.providers.base.PROVIDERS` gives a site's provider, whose
``replicas`` attribute is its store); ``tests/providers/test_replica_contract.py``
runs one contract suite against every implementation.

Every method is idempotent and safe to call again after a crash at any point:
a point is either sealed (listed by :meth:`chain`) or not; a partial point is
never listed and never read by a failover.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from siterecovery.disk.base import BlockDevice
from siterecovery.domain.model import Site


class ReplicaStore(Protocol):
    """The recovery-point chains of the items replicating to one kind of site."""

    def chain(self, site: Site, item: str, disk: str) -> list[str]:
        """The sealed points of one disk, oldest first ([] when none)."""
        ...

    def begin(
        self, site: Site, item: str, disk: str, seq: int, size: int
    ) -> AbstractContextManager[BlockDevice]:
        """The new point ``seq`` of the chain, writable, as the newest sealed
        point's image plus what the caller writes (blank when the chain is empty).

        A partial point of the same ``seq`` on the same parent is kept and
        reopened (a resumed sync continues where it stopped); any other partial
        point is discarded, and so is every sealed point numbered ``seq`` or
        later: the vault numbers a point in the transaction that records it, so
        those were sealed by a pass that died before its record and are not
        points (the new point's parent is the newest one before ``seq``). The
        device is flushed when the context exits
        without an error. Raises DiskFull when the store has no space left.
        """
        ...

    def discard(self, site: Site, item: str, disk: str) -> None:
        """Remove every partial (unsealed) point of the disk; its space goes back."""
        ...

    def seal(self, site: Site, item: str, disk: str, seq: int) -> str:
        """Make the partial point ``seq`` a sealed point, atomically; returns
        its name. Idempotent: sealing a sealed point returns its name."""
        ...

    def open_point(
        self, site: Site, item: str, disk: str, name: str
    ) -> AbstractContextManager[BlockDevice]:
        """The image of the disk at sealed point ``name``, read-only."""
        ...

    def merge(self, site: Site, item: str, disk: str, *, child: str, parent: str,
              grandchild: str | None) -> None:  # fmt: skip
        """Delete point ``parent``'s own image by folding ``child`` into it:
        afterwards ``parent``'s name holds the image of ``child``'s point,
        ``child`` is gone and ``grandchild`` reads on top of ``parent``.
        Each step is idempotent: a crash in the middle is finished by calling
        again with the same arguments."""
        ...

    def delete(self, site: Site, item: str, *, keep: frozenset[str] = frozenset()) -> list[str]:
        """Delete every chain of the item except the named points (a VM at the
        site reads through them); returns the names kept."""
        ...

    def space_used(self, site: Site, item: str) -> int:
        """Bytes the item's chains occupy at the site (allocated, not virtual)."""
        ...

    def location(self, site: Site, item: str, disk: str) -> str:
        """Where the disk's chain lives, for messages (a directory, a container)."""
        ...

    def space_free(self, site: Site) -> int | None:
        """Bytes still free for new points at the site (None: unknown)."""
        ...

    # Shared with the site's hypervisor (inside one agent, never across sites) ------

    def point_image(self, site: Site, item: str, disk: str, name: str) -> Path:
        """The image of sealed point ``name`` for the site's hypervisor to base a
        VM disk on (an overlay: nothing copied). PointNotFound if not sealed."""
        ...

    def adopt(self, site: Site, item: str, disk: str, seq: int, image: Path) -> str:
        """Make a stopped VM's disk ``image`` (of the site's hypervisor) point
        ``seq`` of the chain, moved, not copied (reprotect: the data left at the
        site becomes the common base). Idempotent; returns the point's name."""
        ...
