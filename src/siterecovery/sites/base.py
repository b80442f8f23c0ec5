"""What the engine asks of a site: the interface between the control plane and
the data plane of one site.

The engine (vault, jobs, scheduler, API) never opens a disk: it tells each
site's agent what to do through :class:`SiteAgent` and records the results.
Everything crossing this interface is a value (names, numbers, these frozen
dataclasses, JSON documents) — never a path, a QMP client or a socket — so a
site can be another machine (:class:`~siterecovery.sites.remote.RemoteAgent`
over HTTPS) or this process (:class:`~siterecovery.sites.local.InProcessAgent`,
which is also what the agent process runs).

Data moves between two sites without the engine: the target site opens a
*receipt* for one disk (:meth:`SiteAgent.receive_point`: a one-time ticket and
the address of its wire server), the engine hands the receipt to the source
site (:meth:`SiteAgent.send_disk`), which reads its own disk and streams to
the target; the engine sees only progress, checkpoints and the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from siterecovery.domain.model import DiskDef, OsType, Vm, VmPower

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)`` of one transfer."""

Checkpoint = Callable[[int], None]
"""``checkpoint(offset)``: everything below ``offset`` is written and flushed at
the target; the caller persists it so that a restarted transfer resumes there."""


def vm_to_dict(vm: Vm) -> dict[str, Any]:
    return vm.to_dict()


def vm_from_dict(data: dict[str, Any]) -> Vm:
    return Vm(
        name=str(data["name"]),
        site=str(data["site"]),
        host=str(data["host"]),
        os=OsType(data["os"]),
        disks=tuple(DiskDef(str(d["name"]), int(d["size"])) for d in data["disks"]),
        nics=tuple(str(n) for n in data["nics"]),
        cpus=int(data.get("cpus", 1)),
        memory_mib=int(data.get("memory_mib", 512)),
        workload=bool(data.get("workload", True)),
        workload_link=data.get("workload_link"),
    )


@dataclass(frozen=True, slots=True)
class Receipt:
    """Where a source sends one disk: the target's wire address, the one-time
    ticket that opens it, the target's certificate (pinned by the sender) and
    whether the new point has a parent (the chain is not empty)."""

    ticket: str
    address: str
    cert_pem: str | None
    has_parent: bool
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Receipt:
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Transfer:
    """How one disk is sent: the wire policy of its item."""

    threads: int = 4
    max_rate: int = 0
    compress: bool = False
    key: str | None = None
    """Name of the key sealing the payloads in flight (None: TLS only)."""
    key_material: str | None = None
    """The key itself (hex), handed by the engine over the authenticated channel
    for this transfer only; never logged, never stored by the agent."""
    verify: bool = False
    """Compare whole-disk digests of both sides after the copy (the integrity proof)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transfer:
        return cls(**data)

    def __repr__(self) -> str:  # never show the key material
        return f"Transfer(threads={self.threads}, max_rate={self.max_rate}, key={self.key!r})"


@dataclass(frozen=True, slots=True)
class FrozenDisks:
    """What a freeze made: per VM, per disk, why change tracking can (``bitmap``)
    or cannot be trusted; per VM the guest's last acknowledged record (None:
    not quiesced, a crash-consistent point)."""

    tracking: dict[str, dict[str, str]]
    seqs: dict[str, int | None]
    paused_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrozenDisks:
        return cls(
            tracking={k: dict(v) for k, v in data["tracking"].items()},
            seqs={k: (None if v is None else int(v)) for k, v in data["seqs"].items()},
            paused_seconds=float(data.get("paused_seconds", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class SiteInfo:
    """An agent's own description: for ``site list``."""

    site: str
    version: str
    reachable: bool
    url: str | None = None
    clock_offset: float | None = None
    round_trip: float | None = None
    error: str | None = None
    since: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SiteAgent(Protocol):
    """One site's data plane, as the engine sees it. Methods are idempotent
    where they say so, thread-safe, and raise our error tree (an unreachable
    agent: ``AgentUnreachable``)."""

    name: str

    # The site --------------------------------------------------------------------

    def info(self) -> SiteInfo: ...

    def prepare(self, *, storage: str = "block") -> None:
        """Create the site's storage layout. Idempotent."""
        ...

    def storage(self) -> str: ...

    # VMs (the hypervisor) ------------------------------------------------------------

    def create_vm(self, vm: Vm) -> None:
        """Define the VM with blank disks. Idempotent."""
        ...

    def delete_vm(self, vm: Vm) -> None:
        """Stop the VM if running; delete its definition and disks. Idempotent."""
        ...

    def power(self, vm: Vm) -> VmPower: ...

    def start_vm(self, vm: Vm) -> None: ...

    def stop_vm(self, vm: Vm, *, timeout: float = 30.0) -> None: ...

    def guest_state(self, vm: Vm) -> dict[str, object]: ...

    # Replica chains (the replica store) -----------------------------------------------

    def chain(self, item: str, disk: str) -> list[str]:
        """The sealed points of one disk of ``item`` at this site, oldest first."""
        ...

    def receive_point(
        self, item: str, disk: str, seq: int, size: int, *, resume: bool = False
    ) -> Receipt:
        """Open point ``seq`` of the disk's chain for one sender (see module doc).
        With ``resume``, a partial point of the same seq is kept (a resumed
        sync); otherwise partial points are discarded first."""
        ...

    def end_receive(self, receipt: Receipt, *, keep: bool) -> None:
        """Close what :meth:`receive_point` opened: flushed and kept as the
        partial point (``keep``) or discarded. Idempotent."""
        ...

    def seal(self, item: str, seq: int, disks: list[str]) -> dict[str, str]:
        """Seal point ``seq`` of every named disk; their point names. Idempotent."""
        ...

    def discard(self, item: str, disk: str) -> None:
        """Remove the disk's partial points (an abandoned pass). Idempotent."""
        ...

    def merge(self, item: str, disk: str, *, child: str, parent: str,
              grandchild: str | None) -> None:  # fmt: skip
        """Retention: fold ``child`` into ``parent`` (see ReplicaStore.merge)."""
        ...

    def space_free(self) -> int | None: ...

    def location(self, item: str, disk: str) -> str:
        """Where the disk's chain lives at the site, for messages."""
        ...

    # Passes (the source side of replication) -----------------------------------------

    def freeze(self, vms: list[Vm], tag: str, *, initial: bool, quiesce: bool) -> FrozenDisks:
        """Quiesce every guest (``quiesce``), freeze every disk of every VM at
        one instant (a new checkpoint ``tag`` and point-in-time views), thaw.
        The views stay open until :meth:`release`. Re-freezing with the tag of
        views still open resumes them (``tracking`` = ``resumed``)."""
        ...

    def send_disk(
        self,
        vm: Vm,
        disk: str,
        tag: str,
        receipt: Receipt,
        transfer: Transfer,
        *,
        initial: bool,
        resume: int = 0,
        progress: Progress | None = None,
        checkpoint: Checkpoint | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Send the frozen view ``tag`` of ``disk`` to ``receipt``; the disk's
        report (mode, bytes read/written/sent, digests when verified)."""
        ...

    def release(self, vm: Vm, tag: str, *, drop_older: bool) -> None:
        """Release the views of ``tag``; with ``drop_older``, the point is
        recorded: drop every older checkpoint. Idempotent."""
        ...
