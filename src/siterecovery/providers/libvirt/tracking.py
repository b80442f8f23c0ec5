"""Change tracking and point-in-time views of a running libvirt domain.

The libvirt :class:`~siterecovery.disk.tracking.DiskAccess`: a *checkpoint* is
a libvirt domain checkpoint ``sr-<name>`` (a persistent dirty bitmap on every
disk of the access); a *view* is one disk of a pull-mode backup job
(``virDomainBackupBegin``): qemu fleeces the disks into scratch files and
serves them over NBD on a unix socket in the work directory, each disk as
export ``<prefix><hash of tag>-<target>`` with, when incremental, its dirty
bitmap published under the same name plus ``-b``. A job is recognised as ours
by those names in its XML (``backupGetXMLDesc``), so a restarted process finds
its views again and cleans up what a crashed one left.

What libvirt does differently from qemu-storage-daemon (``disk/checkpoints.py``):

- Checkpoints are the domain's, not a disk's: creating or dropping one through
  a disk's tracker does it for every disk of the access.
- Every checkpoint's bitmap keeps recording (libvirt never disables them): the
  newest checkpoint of ours is reported ``recording``, the older ones not, and
  an older one's ``count`` keeps growing. An incremental backup from the oldest
  checkpoint of a ``since`` therefore covers the union the caller asks for
  (and possibly more: never less).
- One backup job per domain: a view of another tag while one is active raises
  :class:`~siterecovery.domain.errors.DiskViewBusy`; releasing one disk's view
  ends the job, hence the views of the other disks frozen with it.
- Bitmap granularity is libvirt's choice (the qcow2 cluster size): the
  ``granularity`` of :meth:`LibvirtDiskAccess.freeze` is ignored.
- Inconsistency: after qemu died uncleanly, libvirt keeps the checkpoint but
  qemu's bitmap is broken or gone. libvirt then omits the disk's ``size`` from
  the checkpoint XML asked with ``VIR_DOMAIN_CHECKPOINT_XML_SIZE`` (and refuses
  an incremental backup from it): a disk entry without ``size`` is
  ``inconsistent``. Such a checkpoint is dropped as metadata only (libvirt
  refuses to delete a bitmap that is not there).
"""

from __future__ import annotations

import hashlib
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from siterecovery.disk.checkpoints import BITMAP_PREFIX, TEARDOWN_TIMEOUT
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.tracking import VIEW_PREFIX, BitmapState, ChangeTracker, DiskAccess, View
from siterecovery.domain.errors import BitmapInconsistent, DiskError, DiskViewBusy, InternalError
from siterecovery.providers.libvirt.connection import Domain
from siterecovery.providers.libvirt.domains import checkpoint_xml
from siterecovery.providers.local.paths import run_root

MAX_SOCKET_PATH = 107
"""Longest unix socket path (bytes) the kernel takes."""
_BITMAP_SUFFIX = "-b"
_POLL = 0.05


@dataclass(frozen=True, slots=True)
class _Job:
    """The domain's active backup job: its socket and each disk's export
    (target -> (export name, exported bitmap or None))."""

    socket: Path
    exports: dict[str, tuple[str, str | None]]

    @property
    def ids(self) -> set[str]:
        """The job ids (``<prefix><tag hash>``) its exports are named after."""
        return {export.rsplit("-", 1)[0] for export, _ in self.exports.values()}


def job_id(prefix: str, tag: str) -> str:
    """The name every part of the backup job frozen with ``tag`` starts with."""
    return prefix + hashlib.sha256(tag.encode()).hexdigest()[:10]


class LibvirtView:
    """One disk of a pull-mode backup job: valid until the job ends."""

    def __init__(
        self, access: LibvirtDiskAccess, tag: str, socket: Path, export: str, bitmap: str | None
    ) -> None:
        self._access = access
        self._tag = tag
        self._socket = socket
        self._export = export
        self._bitmap = bitmap

    @property
    def tag(self) -> str:
        return self._tag

    @property
    def export(self) -> str:
        return self._export

    @property
    def has_bitmap(self) -> bool:
        return self._bitmap is not None

    def open(self) -> NbdDevice:
        """A new read-only NBD connection to the view (one per thread)."""
        return NbdDevice.connect(self._socket, self._export, bitmap=self._bitmap)

    def release(self) -> None:
        """Abort the backup job if it is still this view's: the views of the
        other disks frozen with it end too. Checkpoints are untouched. Idempotent."""
        self._access._end_job(self._export.rsplit("-", 1)[0])


class LibvirtTracker:
    """The checkpoints and views of one disk (``target``) of a domain; views of
    ``prefix`` only."""

    def __init__(self, access: LibvirtDiskAccess, disk: str, target: str, prefix: str) -> None:
        self.access = access
        self.disk = disk
        self.target = target
        self.prefix = prefix

    def bitmaps(self) -> list[BitmapState]:
        """Our checkpoints, oldest first; the newest is the ``recording`` one."""
        names = self.access._chain()
        return [self.access._state(name, self.target, name == names[-1]) for name in names]

    def find_view(self, tag: str) -> LibvirtView | None:
        return self.access._find(self.prefix, tag, self.target)

    def drop(self, names: Iterable[str]) -> None:
        """Delete these checkpoints (of the whole domain). Idempotent."""
        present = set(self.access._chain())
        for name in dict.fromkeys(names):
            if name in present:
                self.access._delete(name)

    def ensure_tracking(self, name: str) -> str:
        """The newest checkpoint of ours, after creating ``name`` (on every disk
        of the access) when there is none."""
        with self.access._lock:
            names = self.access._chain()
            if names:
                return names[-1]
            self.access.domain.create_checkpoint(self.access._checkpoint_xml(name))
            return name

    def cleanup_views(self, keep_tags: Iterable[str] = ()) -> list[str]:
        """Abort the domain's backup job if it is of this prefix and of none of
        ``keep_tags``; remove our prefix's leftover scratch files and sockets.
        Returns the job ids ended. Idempotent."""
        keep = {job_id(self.prefix, tag) for tag in keep_tags}
        with self.access._lock:
            job = self.access._job()
            ours = set() if job is None else {i for i in job.ids if i.startswith(self.prefix)}
            ended = sorted(ours - keep)
            if ended:
                self.access._end_job(ended[0])
            self.access._remove_leftovers(self.prefix)
        return ended


class LibvirtDiskAccess:
    """The disks of one RUNNING libvirt domain: ``disks`` maps our disk names
    to the domain's target devices (``{"d0": "vda"}``) in the VM's order;
    ``work_dir`` holds the backup jobs' scratch files and, when its path is
    short enough, their NBD sockets (else a directory under
    :func:`~siterecovery.providers.local.paths.run_root`). qemu must see
    ``work_dir`` at the same path (libvirtd on this host).

    Trackers of one access may be used from several threads: the changes to the
    domain's jobs and checkpoints are serialized per domain in this process.
    """

    def __init__(self, domain: Domain, disks: dict[str, str], work_dir: Path) -> None:
        self.domain = domain
        self.disks = dict(disks)
        self.work_dir = Path(work_dir).absolute()
        self.socket_dir = _socket_dir(self.work_dir)
        self._lock = _lock_of(self.key)

    @property
    def running(self) -> bool:
        return True

    @property
    def key(self) -> str:
        return f"{self.domain.uri}#{self.domain.name}"

    def open(self, disk: str, *, writable: bool = False) -> NbdDevice:
        """Not offered: a running domain's disk is read through a view."""
        raise DiskError(
            detail=f"disk '{disk}' of running domain '{self.domain.name}' is read through "
            "a point-in-time view (freeze), not opened directly"
        )

    def allocated(self, disk: str) -> int:
        """libvirt's ``allocation`` of the disk (0 when it cannot tell)."""
        return self.domain.disk_allocation(self.disks[disk]) or 0

    def trackers(self, *, prefix: str = VIEW_PREFIX) -> dict[str, ChangeTracker]:
        return {
            disk: LibvirtTracker(self, disk, target, prefix) for disk, target in self.disks.items()
        }

    def freeze(
        self,
        requests: Sequence[tuple[ChangeTracker, Sequence[str]]],
        tag: str,
        *,
        new_checkpoint: str | None,
        granularity: int | None = None,
    ) -> list[View]:
        """One pull-mode backup job of every requested disk (one instant),
        incremental from the oldest checkpoint of the requests' common
        ``since``, creating ``sr-<new_checkpoint>`` in the same call.
        ``granularity`` is ignored (libvirt offers no control). Idempotent by
        ``tag`` while the job lives; DiskViewBusy when a job of another tag
        runs (``cleanup_views`` of its prefix ends it)."""
        trackers, since = self._requests(requests, new_checkpoint)
        with self._lock:
            if self._job() is None:
                self._begin(trackers, tag, since, new_checkpoint)
            return [self._frozen(tracker, tag) for tracker in trackers]

    # Freezing.

    def _requests(
        self, requests: Sequence[tuple[ChangeTracker, Sequence[str]]], new_checkpoint: str | None
    ) -> tuple[list[LibvirtTracker], list[str]]:
        trackers = [tracker for tracker, _ in requests]
        own = [t for t in trackers if isinstance(t, LibvirtTracker) and t.access.key == self.key]
        if not requests or len(own) != len(trackers):
            raise InternalError(detail=f"trackers of another domain than {self.key}: {trackers}")
        if len({frozenset(since) for _, since in requests}) > 1 or len({t.prefix for t in own}) > 1:
            raise InternalError(detail="the disks of one libvirt freeze share one since and prefix")
        since = list(dict.fromkeys(requests[0][1]))
        if new_checkpoint is None and since:
            raise InternalError(detail="a read-only view (no new checkpoint) has no since")
        return own, since

    def _begin(
        self,
        trackers: list[LibvirtTracker],
        tag: str,
        since: list[str],
        new_checkpoint: str | None,
    ) -> None:
        chain = self._chain()
        if new_checkpoint is not None and new_checkpoint in chain:
            raise DiskError(detail=f"checkpoint '{new_checkpoint}' of {self.key} already exists")
        for tracker in trackers:
            for name in since:
                if name not in chain or self._state(name, tracker.target, False).inconsistent:
                    raise BitmapInconsistent(disk=tracker.disk, checkpoint=name)
        incremental = min(since, key=chain.index) if since else None
        xml = self._backup_xml(job_id(trackers[0].prefix, tag), trackers, incremental)
        self._remove_leftovers(trackers[0].prefix)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        created = None if new_checkpoint is None else self._checkpoint_xml(new_checkpoint)
        self.domain.backup_begin(xml, created)

    def _backup_xml(self, job: str, trackers: list[LibvirtTracker], incremental: str | None) -> str:
        root = ET.Element("domainbackup", mode="pull")
        if incremental is not None:
            ET.SubElement(root, "incremental").text = BITMAP_PREFIX + incremental
        ET.SubElement(root, "server", transport="unix", socket=str(self._socket(job)))
        disks = ET.SubElement(root, "disks")
        for target in self.disks.values():
            if target not in {t.target for t in trackers}:
                ET.SubElement(disks, "disk", name=target, backup="no")
                continue
            export = f"{job}-{target}"
            attributes = {"name": target, "backup": "yes", "type": "file", "exportname": export}
            if incremental is not None:
                attributes["exportbitmap"] = export + _BITMAP_SUFFIX
            disk = ET.SubElement(disks, "disk", attributes)
            ET.SubElement(disk, "scratch", file=str(self.work_dir / f"{export}.qcow2"))
        return ET.tostring(root, encoding="unicode")

    def _frozen(self, tracker: LibvirtTracker, tag: str) -> LibvirtView:
        view = self._find(tracker.prefix, tag, tracker.target)
        if view is not None:
            return view
        job = self._job()
        holder = ", ".join(sorted(job.ids)) if job is not None else "none"
        raise DiskViewBusy(vm=self.domain.name, holder=holder, uri=self.domain.uri)

    # Observing the domain.

    def _job(self) -> _Job | None:
        xml = self.domain.backup_xml()
        if xml is None:
            return None
        root = ET.fromstring(xml)
        server = root.find("server")
        socket = Path("" if server is None else server.get("socket", ""))
        exports = {
            disk.get("name", ""): (disk.get("exportname", ""), disk.get("exportbitmap"))
            for disk in root.iterfind("disks/disk")
            if disk.get("backup") == "yes"
        }
        return _Job(socket, exports)

    def _find(self, prefix: str, tag: str, target: str) -> LibvirtView | None:
        job = self._job()
        if job is None or target not in job.exports:
            return None
        export, bitmap = job.exports[target]
        if export != f"{job_id(prefix, tag)}-{target}":
            return None
        return LibvirtView(self, tag, job.socket, export, bitmap)

    def _chain(self) -> list[str]:
        """Our checkpoints, oldest first, along the parents of the newest one
        (libvirt lists parents before their children)."""
        tree = self.domain.checkpoint_tree()
        if not tree:
            return []
        parents = dict(tree)
        name: str | None = tree[-1][0]
        chain = []
        while name is not None:
            chain.append(name)
            name = parents.get(name)
        return [n[len(BITMAP_PREFIX) :] for n in reversed(chain) if n.startswith(BITMAP_PREFIX)]

    def _state(self, name: str, target: str, recording: bool) -> BitmapState:
        xml = self.domain.checkpoint_xml(BITMAP_PREFIX + name, size=True)
        disk = None if xml is None else ET.fromstring(xml).find(f"disks/disk[@name='{target}']")
        size = None if disk is None or disk.get("checkpoint") != "bitmap" else disk.get("size")
        return BitmapState(
            name=name,
            recording=recording,
            persistent=True,
            inconsistent=size is None,
            count=int(size or 0),
        )

    # Changing the domain.

    def _checkpoint_xml(self, name: str) -> str:
        return checkpoint_xml(BITMAP_PREFIX + name, list(self.disks.values()))

    def _delete(self, name: str) -> None:
        with self._lock:
            states = [self._state(name, target, False) for target in self.disks.values()]
            broken = any(state.inconsistent for state in states)
            self.domain.delete_checkpoint(BITMAP_PREFIX + name, metadata_only=broken)

    def _end_job(self, job: str) -> None:
        """Abort the domain's backup job if it is ``job``. Idempotent."""
        with self._lock:
            found = self._job()
            if found is not None and job in found.ids:
                self.domain.abort_job()
                self._wait_job_gone(job)
                self._remove_leftovers(job)

    def _wait_job_gone(self, job: str) -> None:
        """libvirt returns from abortJob before qemu ended the job."""
        deadline = time.monotonic() + TEARDOWN_TIMEOUT
        while (found := self._job()) is not None and job in found.ids:
            if time.monotonic() > deadline:
                raise DiskError(
                    detail=f"the backup job {job} of {self.key} did not end within "
                    f"{TEARDOWN_TIMEOUT:g} s of its abort"
                )
            time.sleep(_POLL)

    def _remove_leftovers(self, prefix: str) -> None:
        """Scratch files and sockets of ``prefix`` no active job uses."""
        job = self._job()
        active = set() if job is None else job.ids
        for directory, pattern in ((self.work_dir, "*.qcow2"), (self.socket_dir, "*.sock")):
            for path in directory.glob(f"{prefix}{pattern}"):
                if not any(path.name.startswith(i) for i in active):
                    path.unlink(missing_ok=True)

    def _socket(self, job: str) -> Path:
        return self.socket_dir / f"{job}.sock"


def _socket_dir(work_dir: Path) -> Path:
    """``work_dir``, or a short directory keyed by its hash when the socket
    paths in it would be too long."""
    longest = work_dir / f"{job_id(VIEW_PREFIX, '')}.sock"
    if len(str(longest).encode()) <= MAX_SOCKET_PATH:
        return work_dir
    return run_root() / f"lv-{hashlib.sha256(str(work_dir).encode()).hexdigest()[:12]}"


_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def _lock_of(key: str) -> threading.RLock:
    """The lock of one domain's job and checkpoint changes in this process."""
    with _locks_guard:
        return _locks.setdefault(key, threading.RLock())


_: type[DiskAccess] = LibvirtDiskAccess
_tracker: type[ChangeTracker] = LibvirtTracker
_view: type[View] = LibvirtView
