"""The views of a failback, at the site of the disks: what the source freezes
and what the target wrote, from the disks' change tracking.

- :func:`freeze_view`: point-in-time views of every disk of the running (phase
  1) or stopped (phase 2, full download) source, an earlier attempt's when
  each disk still has one, and the checkpoint recording after them.
- :func:`written_since`: the extents the target wrote since the failover
  point (its own changes, rewritten from the source in a tracked sync).
- :func:`measure`: allocated bytes and dirty counts (dry-run estimates, the
  phase-2 prediction).

These run next to the disks (``sites/local.py``); the engine sees their
values through :class:`~siterecovery.sites.base.SiteAgent`.
"""

from __future__ import annotations

from dataclasses import dataclass

from siterecovery.disk.tracking import ChangeTracker, DiskAccess, View
from siterecovery.sites.base import Extents, FrozenView, Since


@dataclass(frozen=True, slots=True)
class Frozen:
    """The views of every disk, and what :class:`FrozenView` says of them."""

    views: dict[str, View]
    state: FrozenView


def freeze_view(access: DiskAccess, tag: str, since: Since, granularity: int | None) -> Frozen:
    """The views of ``tag``: an earlier attempt's when every disk still has
    one, else new ones. Saved offsets hold only for the data they were taken
    from (``resumed``), so new views resume only when the checkpoint the lost
    views started recorded nothing (a stopped VM whose transient daemon went
    away cleanly: its disks did not change)."""
    trackers = access.trackers()
    usable = {name: _since(tracker, since) for name, tracker in trackers.items()}
    tracked = since.checkpoint is not None and all(u is not None for u in usable.values())
    found = {name: t.find_view(tag) for name, t in trackers.items()}
    names = sorted({b.name for t in trackers.values() for b in t.bitmaps()})
    previous = _recording(trackers, tag)
    if all(view is not None for view in found.values()):
        # An earlier attempt froze these views and started their checkpoint: it
        # records what came after them, so it is not one of the older bitmaps.
        views = {name: view for name, view in found.items() if view is not None}
        older = [n for n in names if n != previous]
        return Frozen(views, FrozenView(previous, True, older, tracked))
    unchanged = _unchanged(trackers, previous)
    for tracker in trackers.values():
        tracker.cleanup_views(keep_tags=(tag,))
    checkpoint = _free_name(tag, names)
    requests = [(t, (usable[n] or []) if tracked else []) for n, t in trackers.items()]
    fresh = access.freeze(requests, tag, new_checkpoint=checkpoint, granularity=granularity)
    views = dict(zip(trackers, fresh, strict=True))
    return Frozen(views, FrozenView(checkpoint, unchanged, names, tracked))


def _since(tracker: ChangeTracker, since: Since) -> list[str] | None:
    if since.checkpoint is None:
        return None
    if since.older is not None:
        return _newer_than(tracker, since.checkpoint, since.older)
    return usable_since(tracker, since.checkpoint)


def _newer_than(
    tracker: ChangeTracker, checkpoint: str, older: tuple[str, ...]
) -> list[str] | None:
    """The bitmaps started by ``checkpoint``'s freeze or later, if all are consistent."""
    bitmaps = [b for b in tracker.bitmaps() if b.name not in set(older)]
    names = [b.name for b in bitmaps]
    if checkpoint not in names or any(b.inconsistent for b in bitmaps):
        return None
    return names


def usable_since(tracker: ChangeTracker, checkpoint: str | None) -> list[str] | None:
    """Every bitmap of ours when they are all consistent and include ``checkpoint``
    (their union then covers every write since it), else None."""
    bitmaps = tracker.bitmaps()
    names = [b.name for b in bitmaps]
    if checkpoint is None or checkpoint not in names or any(b.inconsistent for b in bitmaps):
        return None
    return names


def written_since(access: DiskAccess, checkpoint: str, tag: str) -> dict[str, Extents] | None:
    """Extents written since ``checkpoint``, per disk, or None if unknown."""
    reader = tag + "t"
    trackers = access.trackers()
    requests = []
    for tracker in trackers.values():
        tracker.cleanup_views()
        tracker.drop([reader])  # left by an interrupted attempt
        since = usable_since(tracker, checkpoint)
        if since is None:
            return None
        requests.append((tracker, since))
    # One freeze for every disk: a hypervisor's checkpoint may span the VM's
    # disks (libvirt's do), so ``reader`` is made once.
    views = access.freeze(requests, reader, new_checkpoint=reader)
    found: dict[str, Extents] = {}
    try:
        for name, view in zip(trackers, views, strict=True):
            with view.open() as device:
                found[name] = [(e.start, e.length) for e in device.dirty_extents() if e.dirty]
    finally:
        for view in views:
            view.release()
        for tracker in trackers.values():
            tracker.drop([reader])
    return found


def measure(access: DiskAccess, since: str | None) -> dict[str, object]:
    """Allocated bytes, bytes marked since ``since`` (None: unknown), and per bitmap."""
    trackers = access.trackers()
    allocated = sum(access.allocated(disk) for disk in trackers)
    bitmaps: dict[str, int] = {}
    marked: int | None = 0
    for tracker in trackers.values():
        states = tracker.bitmaps()
        for b in states:
            bitmaps[b.name] = bitmaps.get(b.name, 0) + b.count
        names = usable_since(tracker, since)
        if names is None or marked is None:
            marked = None
        else:
            marked += sum(b.count for b in states if b.name in names)
    return {"allocated": allocated, "since": marked, "bitmaps": bitmaps}


def _unchanged(trackers: dict[str, ChangeTracker], checkpoint: str) -> bool:
    """Whether ``checkpoint`` records, consistent and empty, on every disk:
    nothing was written since the freeze that started it."""
    return all(
        any(b.name == checkpoint and b.recording and not b.inconsistent and b.count == 0
            for b in tracker.bitmaps())
        for tracker in trackers.values()
    )  # fmt: skip


def _free_name(tag: str, taken: list[str]) -> str:
    """``tag``, or ``tag`` with a suffix when an earlier attempt left that bitmap."""
    name, attempt = tag, 1
    while name in taken:
        name, attempt = f"{tag}r{attempt}", attempt + 1
    return name


def _recording(trackers: dict[str, ChangeTracker], tag: str) -> str:
    """The checkpoint a found view's freeze started (the newest recording name
    of ``tag``: ``tag``, then ``tag``r1, r2…)."""
    names = {b.name for t in trackers.values() for b in t.bitmaps() if b.recording}
    attempts = {k: n for n in names if (k := _attempt(tag, n)) is not None}
    return attempts[max(attempts)] if attempts else tag


def _attempt(tag: str, name: str) -> int | None:
    """0 for ``tag``, k for ``tag``rk (see :func:`_free_name`), else None."""
    if name == tag:
        return 0
    suffix = name[len(tag) + 1 :]
    return int(suffix) if name.startswith(tag + "r") and suffix.isdigit() else None
