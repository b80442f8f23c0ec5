"""The pure model: value objects for the vault's inventory and protection state.

Nothing here does I/O. The store converts rows to these objects; services and
shells pass them around; ``to_dict()`` gives the JSON shape of the API.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from siterecovery.domain.errors import describe
from siterecovery.domain.lifecycle import ItemState


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z") if moment else None


def failure(exc: BaseException) -> dict[str, Any]:
    """An item's ``last_error``: the error document and when it happened."""
    return {**describe(exc), "time": iso(utcnow())}


class SiteRole(StrEnum):
    ON_PREMISES = "on-premises"
    CLOUD = "cloud"


class OsType(StrEnum):
    LINUX = "linux"
    WINDOWS = "windows"


class VmPower(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    INCONSISTENT = "inconsistent"


class PointType(StrEnum):
    CRASH_CONSISTENT = "crash-consistent"
    APP_CONSISTENT = "app-consistent"


class Health(StrEnum):
    HEALTHY = "healthy"
    WARNING = "warning"
    CRITICAL = "critical"
    NONE = "none"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_COMPLETION = "awaiting-completion"
    AWAITING_ACTION = "awaiting-action"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True, slots=True)
class Site:
    name: str
    provider: str
    path: str
    role: SiteRole
    max_rate: int = 0
    """Bytes/s this site may send to other sites, summed over all its
    concurrent transfers (0: no cap); each item's own ``max_rate`` applies too."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Host:
    site: str
    name: str
    switches: tuple[str, ...]
    connected: bool = True
    kind: str = "local"
    uri: str | None = None
    """How the site's agent reaches the hypervisor (libvirt: ``qemu:///system``,
    ``qemu+ssh://…``); None for the local kind."""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "switches": list(self.switches)}


@dataclass(frozen=True, slots=True)
class DiskDef:
    """One virtual disk of a VM: ``name`` is its node/export name (``d0``, ``d1``…);
    ``bus`` how the guest sees it (``virtio``, ``scsi``, ``sata``, ``ide``): a
    failed-over copy keeps it."""

    name: str
    size: int
    bus: str = "virtio"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Vm:
    name: str
    site: str
    host: str
    os: OsType
    disks: tuple[DiskDef, ...]
    nics: tuple[str, ...]
    cpus: int = 1
    memory_mib: int = 512
    workload: bool = True
    workload_link: str | None = None
    """The lab application's dependency: every record this VM's workload writes
    names the latest acknowledged record of the VM ``workload_link`` at the same
    site (db01's rows refer to web01's), so a cross-VM check can tell whether
    two images are consistent with each other."""
    nic_models: tuple[str, ...] = ()
    """The model of each NIC (``virtio``, ``e1000``…), in ``nics``' order; empty:
    virtio. A failed-over copy keeps them (the guest's drivers expect them)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "disks": [d.to_dict() for d in self.disks],
            "nics": list(self.nics),
            "nic_models": list(self.nic_models),
        }


COMPRESSIONS = ("none", "zstd")
"""What a policy's ``compress`` may be: payloads as they are, or zstd on the wire."""


@dataclass(frozen=True, slots=True)
class Policy:
    """Replication policy of an item. Durations are seconds, rates bytes/second.

    The wire policy of its transfers between sites: ``compress`` (``none`` or
    ``zstd``), ``key`` (the name of a vault key sealing every frame in flight,
    on top of TLS; None: TLS only) and ``max_rate``. Replicas at rest are not
    encrypted by the key."""

    interval: float = 30.0
    app_consistent_every: int = 0
    retention: float = 24 * 3600.0
    threads: int = 4
    max_rate: int = 0
    verify_points: bool = False
    compress: str = "none"
    key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Item:
    """A VM under protection: data flows from ``active_site`` to ``standby_site``."""

    vm: str
    active_site: str
    standby_site: str
    state: ItemState
    policy: Policy
    created: datetime
    last_error: dict[str, Any] | None = None
    cycles: int = 0
    last_cycle: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "state": self.state.value,
            "active_site": self.active_site,
            "standby_site": self.standby_site,
            "direction": f"{self.active_site} -> {self.standby_site}",
            "policy": self.policy.to_dict(),
            "created": iso(self.created),
            "last_error": self.last_error,
            "cycles": self.cycles,
            "last_cycle": iso(self.last_cycle),
        }


@dataclass(frozen=True, slots=True)
class RecoveryPoint:
    """A sealed, retained image of every disk of an item at one instant.

    ``files`` maps a disk name to its chain file (relative to the item's
    replica directory at ``site``); the image of the disk at this point is that
    file read with its backing chain.
    """

    id: str
    vm: str
    site: str
    seq: int
    time: datetime
    type: PointType
    files: dict[str, str]
    bytes: int = 0
    source_digests: dict[str, str] = field(default_factory=dict)
    workload_seq: int | None = None
    common: str | None = None
    """The id of the replication group's common point this point belongs to
    (taken at the same instant as the other members'), or None."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "common": self.common,
            "id": self.id,
            "vm": self.vm,
            "site": self.site,
            "seq": self.seq,
            "time": iso(self.time),
            "type": self.type.value,
            "files": dict(self.files),
            "bytes": self.bytes,
            "source_digests": dict(self.source_digests),
            "workload_seq": self.workload_seq,
        }


@dataclass(frozen=True, slots=True)
class JobStep:
    name: str
    state: str
    started: datetime | None = None
    finished: datetime | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "started": iso(self.started),
            "finished": iso(self.finished),
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    kind: str
    vm: str | None
    state: JobState
    created: datetime
    updated: datetime
    steps: tuple[JobStep, ...] = ()
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0
    error: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def eta_seconds(self) -> float | None:
        remaining = self.bytes_total - self.bytes_done
        if self.rate <= 0 or remaining <= 0:
            return None
        return remaining / self.rate

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "vm": self.vm,
            "state": self.state.value,
            "created": iso(self.created),
            "updated": iso(self.updated),
            "steps": [s.to_dict() for s in self.steps],
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "bytes_transferred": self.bytes_done,
            "rate": self.rate,
            "eta_seconds": self.eta_seconds,
            "error": self.error,
            "params": self.params,
            "result": self.result,
            "allowed_actions": self.allowed_actions(),
            # A failback's headline figures, where scripts look first.
            "phase2": self.result.get("phase2"),
            "integrity": self.result.get("integrity"),
        }

    def allowed_actions(self) -> list[str]:
        if self.state.finished:
            return []
        actions = ["cancel"]
        if self.state is JobState.AWAITING_COMPLETION:
            actions.append("complete")
        if self.state is JobState.AWAITING_ACTION:
            actions.append("resume")
        return actions
