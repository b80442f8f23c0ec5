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

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from siterecovery.domain.errors import SiteRecoveryError
from siterecovery.domain.model import DiskDef, Host, OsType, Vm, VmPower

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)`` of one transfer."""

Checkpoint = Callable[[int], None]
"""``checkpoint(offset)``: everything below ``offset`` is written and flushed at
the target; the caller persists it so that a restarted transfer resumes there."""


def host_from_dict(data: dict[str, Any]) -> Host:
    return Host(
        site=str(data["site"]),
        name=str(data["name"]),
        switches=tuple(str(s) for s in data.get("switches", ())),
        connected=bool(data.get("connected", True)),
        kind=str(data.get("kind", "local")),
        uri=data.get("uri"),
    )


def vm_to_dict(vm: Vm) -> dict[str, Any]:
    return vm.to_dict()


def vm_from_dict(data: dict[str, Any]) -> Vm:
    return Vm(
        name=str(data["name"]),
        site=str(data["site"]),
        host=str(data["host"]),
        os=OsType(data["os"]),
        disks=tuple(
            DiskDef(str(d["name"]), int(d["size"]), str(d.get("bus", "virtio")))
            for d in data["disks"]
        ),
        nics=tuple(str(n) for n in data["nics"]),
        cpus=int(data.get("cpus", 1)),
        memory_mib=int(data.get("memory_mib", 512)),
        workload=bool(data.get("workload", True)),
        workload_link=data.get("workload_link"),
        nic_models=tuple(str(m) for m in data.get("nic_models", ())),
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
    """How one disk is sent: the wire policy of its item and of the sending site.

    Both ends get it: the sender (:meth:`SiteAgent.send_disk`) connects with
    the key and compression, the receiver (:meth:`SiteAgent.receive_point`,
    :meth:`SiteAgent.receive_disks`) registers its ticket with the same key,
    so a sender without it is refused. Rates are bytes/s read from the
    source to send, 0 for no cap."""

    threads: int = 4
    max_rate: int = 0
    """The item's cap, for this transfer alone."""
    site_max_rate: int = 0
    """The sending site's cap, shared by every transfer the site sends at once;
    the latest transfer's value is the site's rate."""
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
        return (
            f"Transfer(threads={self.threads}, max_rate={self.max_rate}, "
            f"site_max_rate={self.site_max_rate}, compress={self.compress}, key={self.key!r})"
        )


QUIESCED = "quiesced"
"""A freeze's outcome for a VM: its guest quiesced (an app-consistent point)."""
NOT_ASKED = "not-asked"
"""Not quiesced because the pass did not ask (a crash-consistent point by policy)."""
NO_GUEST_AGENT = "no-guest-agent"
"""Asked, but the VM has no guest agent that answers: a crash-consistent point."""
FREEZE_FAILED = "freeze-failed"
"""Asked, and the guest's freeze failed (``freeze-failed: WHY``): a crash-consistent
point all the same — the pass does not fail for it (the seeds' guest tools rule)."""


GROUP_NOT_QUIESCED = "group-not-quiesced"
"""A group's common point, crash-consistent because a member did not quiesce
(``group-not-quiesced: VM: ITS OUTCOME``)."""


def quiesce_failed(why: str) -> str:
    return f"{FREEZE_FAILED}: {why}"


@dataclass(frozen=True, slots=True)
class FrozenDisks:
    """What a freeze made: per VM, per disk, why change tracking can (``bitmap``)
    or cannot be trusted; per VM whether its guest quiesced (``quiesce``: one of
    :data:`QUIESCED`, :data:`NOT_ASKED`, :data:`NO_GUEST_AGENT` or
    ``freeze-failed: WHY``) and the last record it acknowledged (``seqs``; None
    when not quiesced or when its guest does not tell)."""

    tracking: dict[str, dict[str, str]]
    seqs: dict[str, int | None]
    paused_seconds: float = 0.0
    quiesce: dict[str, str] = field(default_factory=dict)

    def app_consistent(self, vm: str) -> bool:
        return self.quiesce.get(vm) == QUIESCED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrozenDisks:
        seqs = {k: (None if v is None else int(v)) for k, v in data["seqs"].items()}
        # An agent before the outcomes said only the seq (None: not quiesced).
        said = {vm: QUIESCED if seq is not None else NOT_ASKED for vm, seq in seqs.items()}
        return cls(
            tracking={k: dict(v) for k, v in data["tracking"].items()},
            seqs=seqs,
            paused_seconds=float(data.get("paused_seconds", 0.0)),
            quiesce={k: str(v) for k, v in data.get("quiesce", said).items()},
        )


@dataclass(frozen=True, slots=True)
class PointRef:
    """A sealed point of an item at a site: the file of each disk in its chain."""

    item: str
    files: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item, "files": dict(self.files)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointRef:
        return cls(str(data["item"]), {str(k): str(v) for k, v in data["files"].items()})


@dataclass(frozen=True, slots=True)
class Image:
    """Disks to read at a site: a VM's (a point-in-time view while it runs,
    its guest quiesced when asked) or a sealed point's."""

    vm: Vm | None = None
    point: PointRef | None = None
    quiesce: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": None if self.vm is None else vm_to_dict(self.vm),
            "point": None if self.point is None else self.point.to_dict(),
            "quiesce": self.quiesce,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Image:
        vm, point = data.get("vm"), data.get("point")
        return cls(
            vm=None if vm is None else vm_from_dict(vm),
            point=None if point is None else PointRef.from_dict(point),
            quiesce=bool(data.get("quiesce", False)),
        )


@dataclass(frozen=True, slots=True)
class Since:
    """What a failback view reports changes since (``SiteAgent.freeze_view``).

    ``checkpoint``: every bitmap of the disk, if all are consistent and
    include it (their union covers every write since it); with ``older``
    too: only the bitmaps not in ``older`` (phase 2 after phase 1's
    ``checkpoint``). Neither: nothing (the view is read whole, by checksums
    or a full copy)."""

    checkpoint: str | None = None
    older: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "older": None if self.older is None else list(self.older),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Since:
        older = data.get("older")
        return cls(data.get("checkpoint"), None if older is None else tuple(older))


@dataclass(frozen=True, slots=True)
class FrozenView:
    """What a failback freeze made: the checkpoint recording after the views,
    whether the resume offsets saved for ``tag`` still hold (``resumed``: the
    views are an earlier attempt's, or show the very same data), the bitmaps
    older than the views, and whether every disk's view is tracked."""

    checkpoint: str
    resumed: bool
    older: list[str]
    tracked: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FrozenView:
        return cls(
            str(data["checkpoint"]), bool(data["resumed"]), [str(n) for n in data["older"]],
            bool(data["tracked"]),
        )  # fmt: skip


Extents = list[tuple[int, int]]
"""Byte ranges ``(start, length)`` of one disk."""


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

    def create_vm(
        self, vm: Vm, *, point: PointRef | None = None, checkpoint: str | None = None
    ) -> None:
        """Define the VM with blank disks, or disks that are overlays on
        ``point`` of this site's chains (nothing is copied first), tracking
        their writes from the first one in a bitmap ``checkpoint``. Idempotent."""
        ...

    def replace_disks(self, vm: Vm) -> None:
        """Give the stopped VM new blank disks (a full download follows)."""
        ...

    def adopt_vm(self, vm: Vm, item: str, seq: int) -> None:
        """Reprotect: the stopped VM's disks become point ``seq`` of ``item``'s
        chains at this site (its partial points discarded first) and the VM
        is deleted. Idempotent."""
        ...

    def set_inconsistent(self, vm: Vm, value: bool) -> None:
        """Mark (or clear) the VM's disks as mid-sync: it refuses to start."""
        ...

    def add_host(self, host: Host) -> list[str]:
        """Check that the site reaches ``host`` (a libvirt host: it connects)
        and remember how; returns the host's switches (those asked for, each
        checked on the host; none asked for: all it has). Idempotent; a host
        it cannot reach changes nothing."""
        ...

    def discover(self, host: Host) -> list[dict[str, Any]]:
        """The VMs ``host`` defines or runs, whether siterecovery manages them
        or not ([] for a host whose VMs only the vault knows)."""
        ...

    def import_vm(self, vm: Vm, files: list[str]) -> Vm:
        """A new VM ``vm`` (its ``disks`` left empty) whose disks are the images
        ``files`` at the site (VHDX, VHD, VMDK, qcow2 or raw), converted into
        its own; the VM with its disks. Every file is checked before anything
        is written; a failure leaves no VM."""
        ...

    def export_point(self, point: PointRef, fmt: str, to: str) -> list[dict[str, Any]]:
        """Write the point's image of each disk to ``to`` at the site (a disk
        other than the first to ``to`` with ``-DISK`` before its suffix) in
        format ``fmt``; each file appears only complete and none is replaced."""
        ...

    def adopt_domain(self, host: Host, name: str) -> Vm:
        """Take in the domain ``name`` that the owner of the kvm ``host`` defined
        (its disks stay where they are); the VM to record. Idempotent."""
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
        self,
        item: str,
        disk: str,
        seq: int,
        size: int,
        *,
        resume: bool = False,
        transfer: Transfer | None = None,
    ) -> Receipt:
        """Open point ``seq`` of the disk's chain for one sender (see module doc).
        With ``resume``, a partial point of the same seq is kept (a resumed
        sync); otherwise partial points are discarded first. ``transfer``:
        the wire accepts only a sender sealing with its key (None: TLS only)."""
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

    def delete_chains(self, item: str, *, keep_for: list[Vm]) -> list[str]:
        """Delete the item's chains, except the files a disk of a VM of
        ``keep_for`` at this site reads through; the files kept. Idempotent."""
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
        mode: str | None = None,
        extra_dirty: Extents | None = None,
        progress: Progress | None = None,
        checkpoint: Checkpoint | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Send the frozen view ``tag`` of ``disk`` to ``receipt``; the disk's
        report (mode, bytes read/written/sent, digests when verified, and the
        wire policy applied: ``sealed``, ``compressed``, ``bytes_on_wire`` —
        False, False, 0 for a receipt in the same process, which uses no wire
        — ``max_rate``, ``site_max_rate`` and the seconds slept on each cap,
        summed over the transfer's threads: ``throttled_seconds`` and
        ``site_throttled_seconds``).

        ``mode`` None: a pass chooses (full into an empty chain, checksums for
        an initial sync onto a chain, else tracked when the view has a bitmap).
        A failback names it: ``full``, ``checksum``, or ``tracked`` (the view's
        bitmap ∪ ``extra_dirty``, the target's own writes; checksums when the
        view has no bitmap)."""
        ...

    def release(self, vm: Vm, tag: str, *, drop_older: bool, views: bool = False) -> None:
        """Close the session of ``tag``. With ``drop_older`` the point is
        recorded: the views are released and every older checkpoint dropped;
        with ``views`` only the views are released (a failback phase done);
        otherwise the views stay for a retry to resume. Idempotent."""
        ...

    # Failback (both ends) ---------------------------------------------------------------

    def receive_disks(
        self, vm: Vm, *, blank: bool, transfer: Transfer | None = None
    ) -> dict[str, Receipt]:
        """Open the stopped VM's own disks for one sender each (a failback's
        target); ``blank``: they were just created or replaced. Each receipt
        is closed by :meth:`end_receive`. ``transfer`` as for :meth:`receive_point`."""
        ...

    def written_since(self, vm: Vm, checkpoint: str, tag: str) -> dict[str, Extents] | None:
        """Per disk, what the stopped VM wrote since ``checkpoint`` (a failback
        target's own writes), or None when its tracking cannot tell."""
        ...

    def freeze_view(
        self, vm: Vm, tag: str, *, since: Since, granularity: int | None = None
    ) -> FrozenView:
        """Freeze every disk of the VM (a failback's source) at one instant:
        the views of ``tag`` (an earlier attempt's when each disk still has
        one) and a new checkpoint recording after them, at ``granularity``
        bytes per bit. Views stay open until :meth:`release`."""
        ...

    def measure(self, vm: Vm, *, since: str | None) -> dict[str, Any]:
        """``allocated`` bytes of the VM's disks; ``since``: bytes its bitmaps
        mark since checkpoint ``since`` (None when they cannot tell);
        ``bitmaps``: bytes each bitmap marks (over all disks)."""
        ...

    # Reading images -------------------------------------------------------------------------

    def digests(self, image: Image, *, block: int | None = None) -> dict[str, dict[str, Any]]:
        """Per disk of ``image``, hashed at this site: ``size`` and the
        whole-disk ``digest`` (``block`` None), or ``blocks``, the base64 of
        its ``block``-byte block digests. Only digests leave the site."""
        ...

    def check(self, image: Image) -> dict[str, Any]:
        """The guest journal check of ``image`` (disk 0 first), run at this
        site: the report's dict, and ``where``."""
        ...


def end_after_failure(site: SiteAgent, receipt: Receipt, *, keep: bool) -> None:
    """Close a receipt while another error is on its way up: a failure to
    close (the target's agent is the one that died) is logged, never raised,
    so that the error reported is the one that ended the transfer."""
    try:
        site.end_receive(receipt, keep=keep)
    except SiteRecoveryError as e:
        log.warning("could not close the receipt at site %s after a failure: %s", site.name, e)
