"""Recovery-point chains at the recovery site: qcow2 overlays on a backing chain.

One directory per (item, disk)::

    p000001.qcow2            full copy of the first sync (no backing file)
    p000002.qcow2            changes of cycle 2, backing file "p000001.qcow2"
    p000003.qcow2.partial    a cycle in progress (backing "p000002.qcow2")

A sealed file never changes again, except when retention merges a newer file
into it (see :func:`merge_into_parent`). The image of a disk at a point is the
point's file read with its backing chain, so any standard qemu tool can export
it (``qemu-img convert pNNNNNN.qcow2 disk.raw``), and failing over to a point
creates one more overlay on top of it: nothing is copied first. Backing file
names are relative so a chain directory can be moved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from siterecovery.disk import qemu_img
from siterecovery.domain.errors import DiskError
from siterecovery.keys.master import sync_dir

_SEALED = re.compile(r"^p(\d{6})\.qcow2$")


@dataclass(frozen=True, slots=True)
class ReplicaChain:
    """The chain directory of one disk of one item. Methods are idempotent."""

    directory: Path
    size: int

    def sealed(self) -> list[Path]:
        """Sealed chain files, oldest first."""
        if not self.directory.is_dir():
            return []
        files = [p for p in self.directory.iterdir() if _SEALED.match(p.name)]
        return sorted(files)

    def head(self) -> Path | None:
        """The newest sealed file: the base of the next cycle."""
        files = self.sealed()
        return files[-1] if files else None

    def file_for(self, seq: int) -> Path:
        return self.directory / f"p{seq:06d}.qcow2"

    def partial_for(self, seq: int) -> Path:
        return self.directory / f"p{seq:06d}.qcow2.partial"

    def begin(self, seq: int, *, backing: Path | None) -> Path:
        """The partial overlay of cycle ``seq`` on ``backing``, created if absent.

        An existing partial with the right backing is reused (a resumed sync);
        one with another backing is recreated.
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DiskError(detail=f"replica storage {self.directory} is unusable: {exc}") from exc
        partial = self.partial_for(seq)
        if partial.exists() and _backing_name(partial) == (backing.name if backing else None):
            return partial
        partial.unlink(missing_ok=True)
        qemu_img.create(partial, self.size, backing=backing)
        return partial

    def seal(self, seq: int) -> Path:
        """Rename the partial of ``seq`` to its sealed name, durably. Idempotent;
        FileNotFoundError when ``seq`` was neither begun nor sealed (nothing to
        seal: a point must never be recorded on a file that does not exist)."""
        final = self.file_for(seq)
        partial = self.partial_for(seq)
        try:
            partial.rename(final)
        except FileNotFoundError:
            if not final.exists():
                raise
        sync_dir(self.directory)
        return final

    def discard_from(self, seq: int) -> list[Path]:
        """Remove the sealed files of ``seq`` and later; returns them. The vault
        gives a number to one point only, in the transaction that records it: a
        file at or past the next number was sealed by a pass that died before
        its point was recorded, and is not a point."""
        doomed = [p for p in self.sealed() if _seq_of(p) >= seq]
        for path in doomed:
            path.unlink(missing_ok=True)
        return doomed

    def discard_partials(self, *, keep: int | None = None) -> None:
        """Remove abandoned partial files (all but the one of cycle ``keep``)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.glob("p*.qcow2.partial"):
            if keep is None or path != self.partial_for(keep):
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        for path in self.directory.glob("p*.qcow2*"):
            path.unlink(missing_ok=True)


def merge_into_parent(child: Path, parent: Path, grandchild: Path | None) -> None:
    """Fold ``child`` into ``parent`` so that ``parent`` becomes the child's image.

    Used by retention to delete the point of ``parent``: afterwards ``parent``
    holds the image of ``child``'s point, ``grandchild`` (if any) is re-pointed
    to ``parent`` and ``child`` is deleted. Each step is idempotent, so a crash
    between them is repaired by running the function again.
    """
    if child.exists():
        qemu_img.commit(child, keep_top=True)
    if grandchild is not None and _backing_name(grandchild) != parent.name:
        qemu_img.rebase_unsafe(grandchild, parent)
    child.unlink(missing_ok=True)


def _seq_of(path: Path) -> int:
    found = _SEALED.match(path.name)
    assert found is not None, path
    return int(found.group(1))


def _backing_name(path: Path) -> str | None:
    info = qemu_img.info(path)
    backing = info.get("backing-filename")
    return Path(backing).name if isinstance(backing, str) else None
