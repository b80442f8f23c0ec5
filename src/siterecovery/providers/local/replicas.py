"""The local replica store: qcow2 overlay chains in ``SITE/replicas/ITEM/DISK``.

A point is the file ``pNNNNNN.qcow2`` (see :mod:`siterecovery.points.chain`);
a new point is written as ``pNNNNNN.qcow2.partial`` through a private
qemu-storage-daemon and sealed by a rename. Points are read and written
through NBD, never by path, so callers see only block devices.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from siterecovery.disk import qemu_img
from siterecovery.disk.base import BlockDevice
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.domain.errors import PointNotFound
from siterecovery.domain.model import Site
from siterecovery.points.chain import ReplicaChain, merge_into_parent
from siterecovery.providers.local.paths import run_root


class LocalReplicaStore:
    """Chains as qcow2 files under the site's directory."""

    def chain(self, site: Site, item: str, disk: str) -> list[str]:
        return [p.name for p in self._chain(site, item, disk).sealed()]

    @contextmanager
    def begin(self, site: Site, item: str, disk: str, seq: int, size: int) -> Iterator[BlockDevice]:
        chain = self._chain(site, item, disk, size)
        chain.discard_partials(keep=seq)
        chain.discard_from(seq)
        partial = chain.begin(seq, backing=chain.head())
        with _served(self._run(site, f"writer-{item}-{disk}"), partial, writable=True) as dev:
            yield dev
            dev.flush()

    def discard(self, site: Site, item: str, disk: str) -> None:
        self._chain(site, item, disk).discard_partials()

    def seal(self, site: Site, item: str, disk: str, seq: int) -> str:
        try:
            return self._chain(site, item, disk).seal(seq).name
        except FileNotFoundError:
            raise PointNotFound(name=f"{disk}/p{seq:06d} (partial)", vm=item) from None

    @contextmanager
    def open_point(self, site: Site, item: str, disk: str, name: str) -> Iterator[BlockDevice]:
        path = self.point_image(site, item, disk, name)
        key = f"point-{item}-{disk}-{name}-{id(path)}"
        with _served(self._run(site, key), path, writable=False) as dev:
            yield dev

    def merge(self, site: Site, item: str, disk: str, *, child: str, parent: str,
              grandchild: str | None) -> None:  # fmt: skip
        directory = self.chain_dir(site, item, disk)
        merge_into_parent(
            directory / child, directory / parent, directory / grandchild if grandchild else None
        )

    def delete(self, site: Site, item: str, *, keep: frozenset[str] = frozenset()) -> list[str]:
        root = Path(site.path) / "replicas" / item
        if not root.is_dir():
            return []
        kept: list[str] = []
        for chain in sorted(p for p in root.iterdir() if p.is_dir()):
            names = sorted(p.name for p in chain.iterdir() if p.name in keep)
            if not names:
                shutil.rmtree(chain, ignore_errors=True)
                continue
            for path in chain.iterdir():
                if path.name not in names:
                    path.unlink(missing_ok=True)
            kept.extend(names)
        if not any(root.iterdir()):
            root.rmdir()
        return kept

    def space_used(self, site: Site, item: str) -> int:
        root = Path(site.path) / "replicas" / item
        if not root.is_dir():
            return 0
        return sum(p.stat().st_blocks * 512 for p in root.rglob("p*.qcow2*") if p.is_file())

    def location(self, site: Site, item: str, disk: str) -> str:
        return str(self.chain_dir(site, item, disk))

    def space_free(self, site: Site) -> int | None:
        try:
            return shutil.disk_usage(Path(site.path)).free
        except OSError:
            return None

    # Shared with the site's hypervisor ------------------------------------------

    def point_image(self, site: Site, item: str, disk: str, name: str) -> Path:
        path = self.chain_dir(site, item, disk) / name
        if not name.endswith(".qcow2") or "/" in name or not path.exists():
            raise PointNotFound(name=f"{disk}/{name}", vm=item)
        return path

    def adopt(self, site: Site, item: str, disk: str, seq: int, image: Path) -> str:
        """``image`` becomes ``CHAIN/pSEQ.qcow2``, its own backing (if any)
        re-pointed relative to the new place; partial points go first."""
        self.discard(site, item, disk)
        target = self.chain_dir(site, item, disk) / f"p{seq:06d}.qcow2"
        if image.exists() and not target.exists():
            chain = qemu_img.backing_chain(image)
            target.parent.mkdir(parents=True, exist_ok=True)
            image.rename(target)
            if len(chain) > 1:
                qemu_img.rebase_unsafe(target, chain[1])
        if not target.exists():
            raise PointNotFound(name=f"{disk}/{target.name}", vm=item)
        return target.name

    def chain_dir(self, site: Site, item: str, disk: str) -> Path:
        return Path(site.path) / "replicas" / item / disk

    def _chain(self, site: Site, item: str, disk: str, size: int = 0) -> ReplicaChain:
        return ReplicaChain(self.chain_dir(site, item, disk), size)

    def _run(self, site: Site, key: str) -> Path:
        digest = hashlib.sha1(f"{Path(site.path).resolve()}|{key}".encode()).hexdigest()[:16]
        return run_root() / digest


@contextmanager
def _served(run_dir: Path, path: Path, *, writable: bool) -> Iterator[NbdDevice]:
    """``path`` served by a private daemon (dies with this process's thread)."""
    stale = StorageDaemon.attach(run_dir)
    if stale is not None:
        stale.kill()
    spec = DiskSpec(node="p0", path=path, writable=writable)
    daemon = StorageDaemon.start(run_dir, [spec], detached=False)
    try:
        with NbdDevice.connect(daemon.nbd_socket, "p0", writable=writable) as device:
            yield device
    finally:
        daemon.stop()
