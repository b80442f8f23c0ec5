"""Persisted progress of a resumable sync: per-disk offsets kept in the item's
tracking (``ItemTracking.resume``) under the tag of the view they were taken from."""

from __future__ import annotations

from dataclasses import dataclass, replace

from siterecovery.domain.tracking import ItemTracking, ResumeState
from siterecovery.store.repo import VaultStore


@dataclass(frozen=True, slots=True)
class ResumeOffsets:
    """Offsets of the sync tagged ``tag`` for item ``vm``; another tag's are ignored."""

    store: VaultStore
    vm: str
    tag: str

    def get(self, disk: str) -> int:
        state = self.store.item_tracking(vm=self.vm).resume
        return state.offsets.get(disk, 0) if state is not None and state.tag == self.tag else 0

    def save(self, disk: str, offset: int) -> None:
        """Record ``disk``'s watermark (one transaction: other disks' survive)."""
        self.store.update_item_tracking(vm=self.vm, change=lambda t: self._saved(t, disk, offset))

    def forget(self) -> None:
        """Drop this tag's offsets (they only hold for the view they came from)."""
        self.store.update_item_tracking(vm=self.vm, change=self._forgotten)

    def _saved(self, tracking: ItemTracking, disk: str, offset: int) -> ItemTracking:
        state = tracking.resume
        offsets = state.offsets if state is not None and state.tag == self.tag else {}
        return replace(tracking, resume=ResumeState(self.tag, {**offsets, disk: offset}))

    def _forgotten(self, tracking: ItemTracking) -> ItemTracking:
        state = tracking.resume
        mine = state is not None and state.tag == self.tag
        return replace(tracking, resume=None) if mine else tracking
