"""Persisted progress of a resumable sync: per-disk offsets kept in the item's
``tracking.resume`` under the tag of the view they were taken from."""

from __future__ import annotations

from dataclasses import dataclass

from siterecovery.store.repo import VaultStore


@dataclass(frozen=True, slots=True)
class ResumeOffsets:
    """Offsets of the sync tagged ``tag`` for item ``vm``; another tag's are ignored."""

    store: VaultStore
    vm: str
    tag: str

    def get(self, disk: str) -> int:
        state = self.store.get_tracking(vm=self.vm).get("resume") or {}
        return int(state.get("offsets", {}).get(disk, 0)) if state.get("tag") == self.tag else 0

    def save(self, disk: str, offset: int) -> None:
        state = self.store.get_tracking(vm=self.vm).get("resume") or {}
        offsets = state.get("offsets", {}) if state.get("tag") == self.tag else {}
        resume = {"tag": self.tag, "offsets": {**offsets, disk: offset}}
        self.store.merge_tracking(vm=self.vm, resume=resume)

    def forget(self) -> None:
        """Drop this tag's offsets (they only hold for the view they came from)."""
        state = self.store.get_tracking(vm=self.vm).get("resume") or {}
        if state.get("tag") == self.tag:
            self.store.merge_tracking(vm=self.vm, resume=None)
