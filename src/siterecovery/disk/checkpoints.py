"""Change tracking and point-in-time views of a disk served by qemu-storage-daemon.

A *checkpoint* is a persistent dirty bitmap of ours (qemu name ``sr-<name>``) on
the disk's node: while it records, it marks every block the guest writes. A
*point-in-time view* is a read-only NBD export of the disk as it was at one
instant, while the guest keeps writing (image fleecing):

1. a temporary qcow2 ``FL`` whose backing is the disk node;
2. one atomic ``transaction``: add the new checkpoint (recording), disable every
   checkpoint of ours that records, add a frozen non-persistent bitmap ``READ``
   and merge into it the checkpoints the caller asks changes since, and start a
   ``blockdev-backup sync=none`` from the node into ``FL`` (copy-before-write:
   old data moves to ``FL`` before the guest overwrites it);
3. an NBD export of ``FL`` publishing ``READ`` as ``qemu:dirty-bitmap:<view>``.

Every qemu object of a view (node, job, export, ``READ`` bitmap) and its file
are named after one *view id* derived from the disk node and the caller's tag,
so a view is found again after our process restarts while the daemon keeps
running, and leftovers of a crashed run are found and removed.

Crash facts (QEMU 7.2): persistent bitmaps are written to the image only when the
daemon closes it cleanly (SIGTERM). After an unclean exit every bitmap that was
in the image comes back ``inconsistent`` and a bitmap created since the last
clean start is gone; either way the changes it held are lost and the caller must
fall back to a checksum sync.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.disk import qemu_img
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qmp import QmpClient
from siterecovery.disk.qsd import StorageDaemon
from siterecovery.disk.tracking import VIEW_PREFIX, BitmapState
from siterecovery.domain.errors import BitmapInconsistent, DiskError, QmpError

BITMAP_PREFIX = "sr-"
"""qemu names of our checkpoint bitmaps start with this."""

TEARDOWN_TIMEOUT = 120.0
"""Seconds a view's export or job has to go away (generous: a loaded host)."""
_POLL = 0.01


@dataclass(frozen=True, slots=True)
class _Parts:
    """Which qemu objects of one view exist right now."""

    export: bool
    job: bool
    node: bool
    bitmap: bool


class PointInTimeView:
    """A read-only image of a disk at the instant of a :meth:`Tracker.freeze`.

    Stays valid, whatever the guest writes, until :meth:`release`.
    """

    def __init__(self, tracker: Tracker, tag: str, view_id: str, has_bitmap: bool) -> None:
        self._tracker = tracker
        self._tag = tag
        self._view_id = view_id
        self._has_bitmap = has_bitmap

    @property
    def tag(self) -> str:
        return self._tag

    @property
    def export(self) -> str:
        """NBD export name (also the qemu name of every part of the view)."""
        return self._view_id

    @property
    def has_bitmap(self) -> bool:
        """Whether :meth:`open` devices have :meth:`NbdDevice.dirty_extents`."""
        return self._has_bitmap

    def open(self) -> NbdDevice:
        """A new read-only connection to the view (one per thread)."""
        bitmap = self._view_id if self._has_bitmap else None
        return NbdDevice.connect(self._tracker.nbd_socket, self._view_id, bitmap=bitmap)

    def release(self) -> None:
        """Tear the view down: connections still open are cut. Checkpoints are
        untouched. Idempotent."""
        self._tracker._release(self._view_id)


class Tracker:
    """Checkpoints and views of one disk node of one qemu-storage-daemon.

    ``work_dir`` holds the temporary fleece images of the views (each grows by
    what the guest overwrites while the view lives). One caller at a time per
    tracker; trackers of one daemon may be used from several threads at once
    (a pass's and a live check's views of one node): every change they make
    to the daemon (a view set up or torn down, checkpoints added or dropped)
    is one step under a per-daemon lock, because two such QMP sequences
    interleaved fail in qemu ("Permission conflict on node", two
    copy-before-write filters being inserted at once). ``prefix`` (:data:`VIEW_PREFIX` or
    :data:`CHECK_PREFIX`) keeps two kinds of views of one node apart: each
    tracker sees, finds and cleans up only views of its own prefix.
    """

    def __init__(
        self,
        qmp: QmpClient,
        node: str,
        work_dir: Path,
        nbd_socket: Path,
        *,
        prefix: str = VIEW_PREFIX,
    ) -> None:
        self._qmp = qmp
        self._node = node
        self._work_dir = Path(work_dir).absolute()
        self._nbd_socket = Path(nbd_socket)
        node_hash = hashlib.sha256(node.encode()).hexdigest()[:6]
        self._view_prefix = f"{prefix}{node_hash}-"

    @classmethod
    def of(cls, daemon: StorageDaemon, node: str, work_dir: Path | None = None) -> Tracker:
        """The tracker of ``node`` served by ``daemon`` (views in its run dir by default)."""
        return cls(daemon.qmp(), node, work_dir or daemon.run_dir, daemon.nbd_socket)

    @property
    def node(self) -> str:
        return self._node

    @property
    def nbd_socket(self) -> Path:
        return self._nbd_socket

    def bitmaps(self) -> list[BitmapState]:
        """Our checkpoints on the node, in the daemon's order."""
        return [
            BitmapState(
                name=b["name"][len(BITMAP_PREFIX) :],
                recording=bool(b.get("recording")),
                persistent=bool(b.get("persistent")),
                inconsistent=bool(b.get("inconsistent")),
                count=int(b.get("count", 0)),
            )
            for b in self._node_bitmaps()
            if b.get("name", "").startswith(BITMAP_PREFIX)
        ]

    def freeze(self, tag: str, *, new_checkpoint: str, since: Sequence[str]) -> PointInTimeView:
        """Take a point-in-time view and split the checkpoints, atomically.

        In one transaction: checkpoint ``new_checkpoint`` starts recording, every
        other recording checkpoint of ours stops, and the view's bitmap becomes
        the union of ``since`` (nothing when ``since`` is empty: the caller does
        a full or checksum sync). Idempotent by ``tag``: a view already frozen
        with this tag (e.g. before our process restarted) is returned as is.
        Raises BitmapInconsistent when a checkpoint of ``since`` is inconsistent
        or missing.
        """
        return freeze_together([(self, since)], tag, new_checkpoint=new_checkpoint)[0]

    def find_view(self, tag: str) -> PointInTimeView | None:
        """The complete view frozen with ``tag``, or None."""
        view_id = self._view_id(tag)
        parts = self._parts(view_id)
        if not (parts.job and parts.export):
            return None
        return PointInTimeView(self, tag, view_id, parts.bitmap)

    def drop(self, names: Iterable[str]) -> None:
        """Remove these checkpoints (inconsistent ones too), atomically. Names
        that do not exist are ignored: idempotent."""
        with _serialized(self._qmp):
            present = {b.name for b in self.bitmaps()}
            actions = [
                _action("block-dirty-bitmap-remove", node=self._node, name=BITMAP_PREFIX + name)
                for name in dict.fromkeys(names)
                if name in present
            ]
            if actions:
                self._qmp.execute("transaction", actions=actions)

    def ensure_tracking(self, name: str) -> str:
        """Make sure a checkpoint of ours records; add ``name`` if none does.

        Returns the name of the recording checkpoint. An inconsistent leftover
        named ``name`` is replaced; a consistent stopped one is refused.
        """
        with _serialized(self._qmp):
            states = {b.name: b for b in self.bitmaps()}
            recording = [b.name for b in states.values() if b.recording]
            if recording:
                return recording[0]
            if name in states and not states[name].inconsistent:
                detail = f"checkpoint '{name}' of '{self._node}' exists and is stopped"
                raise DiskError(detail=detail)
            self.drop([name])
            self._qmp.execute(
                "block-dirty-bitmap-add", node=self._node, name=BITMAP_PREFIX + name,
                persistent=True,
            )  # fmt: skip
            return name

    def cleanup_views(self, keep_tags: Iterable[str] = ()) -> list[str]:
        """Release every view of this node except those of ``keep_tags``, with
        whatever is left of views from crashed runs. Returns the view ids
        released. Idempotent."""
        keep = {self._view_id(tag) for tag in keep_tags}
        with _serialized(self._qmp):
            stale = sorted(self._all_view_ids() - keep)
            for view_id in stale:
                self._release(view_id)
        return stale

    # Freezing.

    def _view_id(self, tag: str) -> str:
        return self._view_prefix + hashlib.sha256(tag.encode()).hexdigest()[:10]

    def _check_since(self, since: Sequence[str], new_checkpoint: str | None) -> None:
        states = {b.name: b for b in self.bitmaps()}
        if new_checkpoint is not None and new_checkpoint in states:
            raise DiskError(
                detail=f"checkpoint '{new_checkpoint}' of '{self._node}' already exists"
            )
        for name in since:
            if name not in states or states[name].inconsistent:
                raise BitmapInconsistent(disk=self._node, checkpoint=name)

    def _add_fleece(self, view_id: str) -> None:
        """The temporary image and node of a view (not yet filled by a backup job)."""
        fleece = self._fleece_path(view_id)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        qemu_img.create(fleece, self._virtual_size())
        self._qmp.execute(
            "blockdev-add",
            **{"driver": "qcow2", "node-name": view_id, "backing": self._node},
            file={"driver": "file", "filename": str(fleece)},
        )

    def _freeze_actions(
        self,
        view_id: str,
        new_checkpoint: str | None,
        since: Sequence[str],
        granularity: int | None,
    ) -> list[dict[str, Any]]:
        node = self._node
        fine = {"granularity": granularity} if granularity else {}
        actions = [] if new_checkpoint is None else [
            _action("block-dirty-bitmap-add", node=node, name=BITMAP_PREFIX + new_checkpoint,
                    persistent=True, **fine),
            *(
                _action("block-dirty-bitmap-disable", node=node, name=BITMAP_PREFIX + b.name)
                for b in self.bitmaps()
                if b.recording
            ),
        ]  # fmt: skip
        if since:
            # The read bitmap is as fine as the finest it merges (merging into a
            # coarser one would widen every dirty range to its granularity).
            wanted = {BITMAP_PREFIX + name for name in since}
            grains = [b["granularity"] for b in self._node_bitmaps() if b.get("name") in wanted]
            read = {"granularity": min(grains)} if grains else {}
            actions += [
                _action("block-dirty-bitmap-add", node=node, name=view_id, persistent=False,
                        disabled=True, **read),
                _action("block-dirty-bitmap-merge", node=node, target=view_id,
                        bitmaps=[BITMAP_PREFIX + name for name in dict.fromkeys(since)]),
            ]  # fmt: skip
        backup = {"device": node, "target": view_id, "sync": "none", "job-id": view_id}
        return [*actions, {"type": "blockdev-backup", "data": backup}]

    def _export(self, view_id: str, *, has_bitmap: bool) -> None:
        self._qmp.execute(
            "block-export-add",
            **{"type": "nbd", "id": view_id, "node-name": view_id, "name": view_id},
            writable=False,
            bitmaps=[view_id] if has_bitmap else [],
        )

    # Tearing down.

    def _release(self, view_id: str) -> None:
        """Remove whatever exists of the view, in dependency order. Idempotent."""
        with _serialized(self._qmp):
            self._release_parts(view_id)

    def _release_parts(self, view_id: str) -> None:
        if view_id in self._export_ids():
            self._ignore_refusal("block-export-del", id=view_id, mode="hard")
            self._wait_until(lambda: view_id not in self._export_ids(), f"export {view_id}")
        if view_id in self._job_ids():
            self._ignore_refusal("block-job-cancel", device=view_id, force=True)
            self._wait_until(lambda: view_id not in self._job_ids(), f"job {view_id}")
        if view_id in self._node_names():
            self._qmp.execute("blockdev-del", **{"node-name": view_id})
        if any(b.get("name") == view_id for b in self._node_bitmaps()):
            self._qmp.execute("block-dirty-bitmap-remove", node=self._node, name=view_id)
        self._fleece_path(view_id).unlink(missing_ok=True)

    def _ignore_refusal(self, command: str, **arguments: Any) -> None:
        """Run a teardown command that qemu may refuse because it is already
        under way (the wait that follows is what counts)."""
        with contextlib.suppress(QmpError):
            self._qmp.execute(command, **arguments)

    def _wait_until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + TEARDOWN_TIMEOUT
        while not done():
            if time.monotonic() > deadline:
                raise DiskError(
                    detail=f"{what} of '{self._node}' did not go away within "
                    f"{TEARDOWN_TIMEOUT:g} s (daemon with QMP at {self._qmp.path})"
                )
            time.sleep(_POLL)

    # Observing the daemon.

    def _parts(self, view_id: str) -> _Parts:
        return _Parts(
            export=view_id in self._export_ids(),
            job=view_id in self._job_ids(),
            node=view_id in self._node_names(),
            bitmap=any(b.get("name") == view_id for b in self._node_bitmaps()),
        )

    def _all_view_ids(self) -> set[str]:
        names = self._export_ids() | self._job_ids() | self._node_names()
        names |= {b.get("name", "") for b in self._node_bitmaps()}
        names |= {path.stem for path in self._work_dir.glob(f"{self._view_prefix}*.qcow2")}
        return {name for name in names if name.startswith(self._view_prefix)}

    def _fleece_path(self, view_id: str) -> Path:
        return self._work_dir / f"{view_id}.qcow2"

    def _block_nodes(self) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = self._qmp.execute("query-named-block-nodes", flat=True)
        return nodes

    def _node_names(self) -> set[str]:
        return {node["node-name"] for node in self._block_nodes()}

    def _node_info(self) -> dict[str, Any]:
        for info in self._block_nodes():
            if info["node-name"] == self._node:
                return info
        raise DiskError(detail=f"block node '{self._node}' does not exist")

    def _node_bitmaps(self) -> list[dict[str, Any]]:
        bitmaps: list[dict[str, Any]] = self._node_info().get("dirty-bitmaps", [])
        return bitmaps

    def _virtual_size(self) -> int:
        return int(self._node_info()["image"]["virtual-size"])

    def _export_ids(self) -> set[str]:
        return {export["id"] for export in self._qmp.execute("query-block-exports")}

    def _job_ids(self) -> set[str]:
        return {job["device"] for job in self._qmp.execute("query-block-jobs")}


def freeze_together(
    requests: Sequence[tuple[Tracker, Sequence[str]]],
    tag: str,
    *,
    new_checkpoint: str | None,
    granularity: int | None = None,
) -> list[PointInTimeView]:
    """Freeze several disks of ONE daemon in one QMP transaction.

    ``new_checkpoint`` None takes the views only, touching no checkpoint (a
    read-only look at a running disk, e.g. a check; ``since`` must be empty).

    ``granularity`` (bytes, a power of two) of the new checkpoint: finer than
    the default (the cluster size, 64 KiB) when what follows must be sent
    exactly, e.g. phase 2 of a failback.

    Each request is a tracker and the checkpoints its view must report changes
    since (see :meth:`Tracker.freeze`). Every disk's view shows the same
    instant, so a VM's disks stay crash-consistent with each other. Idempotent
    by ``tag``: disks already frozen with it (the transaction is atomic, so
    either all or none were) are only completed and returned.
    """
    with _serialized(requests[0][0]._qmp):
        return _freeze_together(requests, tag, new_checkpoint, granularity)


def _freeze_together(
    requests: Sequence[tuple[Tracker, Sequence[str]]],
    tag: str,
    new_checkpoint: str | None,
    granularity: int | None,
) -> list[PointInTimeView]:
    fresh: list[tuple[Tracker, str, Sequence[str]]] = []
    for tracker, since in requests:
        view_id = tracker._view_id(tag)
        parts = tracker._parts(view_id)
        if parts.job and not parts.export:
            tracker._export(view_id, has_bitmap=parts.bitmap)
        elif not parts.job:
            tracker._release(view_id)
            tracker._check_since(since, new_checkpoint)
            fresh.append((tracker, view_id, since))
    if fresh:
        _start_fleeces(fresh, new_checkpoint, granularity)
    return [
        PointInTimeView(tracker, tag, view_id, tracker._parts(view_id).bitmap)
        for tracker, view_id in ((t, t._view_id(tag)) for t, _ in requests)
    ]


def _start_fleeces(
    fresh: Sequence[tuple[Tracker, str, Sequence[str]]],
    new_checkpoint: str | None,
    granularity: int | None,
) -> None:
    qmp = fresh[0][0]._qmp
    try:
        for tracker, view_id, _ in fresh:
            tracker._add_fleece(view_id)
        actions = [
            action
            for tracker, view_id, since in fresh
            for action in tracker._freeze_actions(view_id, new_checkpoint, since, granularity)
        ]
        qmp.execute("transaction", actions=actions)
    except BaseException:
        for tracker, view_id, _ in fresh:
            tracker._release(view_id)
        raise
    # From here the checkpoints are split: a failed export is completed by
    # the next freeze with the same tag.
    for tracker, view_id, since in fresh:
        tracker._export(view_id, has_bitmap=bool(since))


_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def _serialized(qmp: QmpClient) -> threading.RLock:
    """The lock of one daemon's view set-ups and tear-downs in this process."""
    with _locks_guard:
        return _locks.setdefault(str(qmp.path), threading.RLock())


def _action(kind: str, **data: Any) -> dict[str, Any]:
    """One action of a QMP ``transaction``."""
    return {"type": kind, "data": data}
