"""A site whose data plane runs in this process: its provider and replica store.

The embedded default's sites are of this kind, and the agent process
(``siterecovery agent serve``) runs one of these for its site: what the
engine does through :class:`~siterecovery.sites.remote.RemoteAgent` over
HTTPS, the agent does here, next to the disks.

Sessions: :meth:`InProcessAgent.freeze` opens the VM's disk access (the VM's
own qemu-storage-daemon, or a transient one for a stopped VM, detached so it
outlives a crash of this process) and keeps it, with the point-in-time
views, until :meth:`release`. A new freeze of the same VM under another tag
closes the older session first.

Receipts: :meth:`receive_point` opens the new point for writing and registers
it under a random ticket, both with this process (a sender in the same
process writes to it directly) and, when this site serves a wire port, with
its :class:`~siterecovery.wire.server.WireServer` (a sender at another site
connects with the ticket over TLS, sealing with the transfer's key if it
has one: the ticket is registered with that key).

Bandwidth: every transfer this site sends reads its source through its
item's cap (``Transfer.max_rate``) and through one token bucket of this
site shared by all of them (``Transfer.site_max_rate``, the latest
transfer's value being the bucket's rate).
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from siterecovery import __version__
from siterecovery.agent.tls import client_context
from siterecovery.disk import formats, qemu_img
from siterecovery.disk.base import BlockDevice, Extent
from siterecovery.disk.digest import block_digests, disk_digest, integrity_proof
from siterecovery.disk.tracking import BitmapState, ChangeTracker, DiskAccess, View
from siterecovery.disk.wrappers import CountingDevice, RateLimitedDevice, TokenBucket, default_burst
from siterecovery.domain.errors import AlreadyExists, DiskError, GuestError, InternalError
from siterecovery.domain.model import DiskDef, Host, Site, Vm, VmPower
from siterecovery.keys import SecretKey
from siterecovery.providers import hosts
from siterecovery.providers.base import GuestAgent, Provider
from siterecovery.providers.local import journal
from siterecovery.providers.replicas import ReplicaStore
from siterecovery.replication.extents import UnionDirtyDevice
from siterecovery.replication.sync import SyncMode, SyncOptions, sync
from siterecovery.sites import views
from siterecovery.sites.base import (
    FREEZE_FAILED,
    NO_GUEST_AGENT,
    NOT_ASKED,
    QUIESCED,
    Checkpoint,
    Extents,
    FrozenDisks,
    FrozenView,
    Image,
    PointRef,
    Progress,
    Receipt,
    Since,
    SiteInfo,
    Transfer,
    quiesce_failed,
)
from siterecovery.sites.images import open_image
from siterecovery.wire.client import RemoteDevice

log = logging.getLogger(__name__)
QUIESCE_TIMEOUT = 60.0
"""Seconds a guest has to quiesce before its point is taken crash-consistent."""
VIRT_TYPE_ENV = "SITERECOVERY_LIBVIRT_VIRT_TYPE"
"""Forces the domain type of new libvirt VMs (``kvm``, or ``qemu``: TCG);
unset, each host's capabilities decide."""
CHECKPOINT_EVERY = 8 << 20  # bytes between persisted offsets of a resumable sync
LOCAL = "local:"


@dataclass
class _Receiving:
    """One open receipt: a writable device (a new point, or a VM's disk),
    open until ended; ``end(keep)`` closes it."""

    device: BlockDevice
    end: Callable[[bool], None]


_RECEIVING: dict[str, _Receiving] = {}
_RECEIVING_GUARD = threading.Lock()


@dataclass
class _Session:
    """A VM's disk access held between a freeze and its release."""

    tag: str
    access: DiskAccess
    stack: ExitStack
    views: dict[str, View] = field(default_factory=dict)

    def trackers(self) -> dict[str, ChangeTracker]:
        return self.access.trackers()


class WireEndpoint(Protocol):
    """What a site serving a wire port offers receipts: its address, its
    certificate and the registration of a ticket with its wire server."""

    @property
    def address(self) -> str: ...

    @property
    def cert_pem(self) -> str | None: ...

    def register(
        self,
        ticket: str,
        device: BlockDevice,
        *,
        key: SecretKey | None = None,
        compress: bool = False,
    ) -> None:
        """Let the sender holding ``ticket`` write ``device`` (clones per
        connection); with ``key``, only a sender sealing every frame with it.
        ``compress``: what the receiver sends back (READ replies) is compressed."""
        ...

    def unregister(self, ticket: str) -> None: ...


class InProcessAgent:
    """:class:`~siterecovery.sites.base.SiteAgent` over this process's provider."""

    def __init__(self, site: Site, provider: Provider, *, wire: WireEndpoint | None = None):
        self.name = site.name
        self.site = site
        self.provider = provider
        # Each VM runs on its host's hypervisor: the provider's, or libvirt for
        # a kvm host (providers/hosts.py).
        self.vms = hosts.HostRouter(provider.hypervisor, libvirt=_libvirt)
        self.replicas: ReplicaStore = provider.replicas
        self.wire = wire
        self._sessions: dict[str, _Session] = {}
        self._guard = threading.Lock()
        self._site_bucket: TokenBucket | None = None
        """The site's sending cap, shared by all its transfers (made at the first cap)."""

    # The site --------------------------------------------------------------------

    def info(self) -> SiteInfo:
        return SiteInfo(site=self.name, version=__version__, reachable=True, clock_offset=0.0)

    def prepare(self, *, storage: str = "block") -> None:
        self.provider.prepare_site(self.site, storage=storage)

    def storage(self) -> str:
        return self.provider.storage(self.site)

    # VMs -------------------------------------------------------------------------

    def create_vm(
        self, vm: Vm, *, point: PointRef | None = None, checkpoint: str | None = None
    ) -> None:
        bases = None
        if point is not None:
            bases = {
                disk: self.replicas.point_image(self.site, point.item, disk, name)
                for disk, name in point.files.items()
            }
        self.vms.create_vm(self.site, vm, bases=bases, checkpoint=checkpoint)

    def replace_disks(self, vm: Vm) -> None:
        self.vms.replace_disks(self.site, vm)

    def add_host(self, host: Host) -> list[str]:
        found = hosts.probe(host)
        hosts.HostBook(self.site.path).put(hosts.HostEntry(host.name, host.kind, host.uri))
        return found

    def discover(self, host: Host) -> list[dict[str, Any]]:
        return hosts.discover(host)

    def adopt_domain(self, host: Host, name: str) -> Vm:
        return self.vms.adopt(self.site, host.name, name)

    def import_vm(self, vm: Vm, files: list[str]) -> Vm:
        sources = [(Path(f), formats.detect(Path(f))) for f in files]
        sized = replace(vm, disks=tuple(
            DiskDef(f"d{i}", qemu_img.virtual_size(path)) for i, (path, _) in enumerate(sources)
        ))  # fmt: skip
        targets = [self.vms.disk_image(self.site, sized, d.name) for d in sized.disks]
        # The disks' directory, made here and only here, claims the name: a
        # second import of it at once is refused before it writes (or deletes)
        # anything of the first's.
        disks_dir = targets[0].parent
        disks_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            disks_dir.mkdir()
        except FileExistsError:
            raise AlreadyExists(kind="VM disk", name=str(disks_dir)) from None
        try:
            for (path, fmt), target in zip(sources, targets, strict=True):
                target.parent.mkdir(parents=True, exist_ok=True)
                formats.write_image(path, fmt, target.absolute(), formats.EXPORTS["qcow2"])
            self.vms.create_vm(self.site, sized)
        except BaseException:
            self.vms.delete_vm(self.site, sized)
            raise
        return sized

    def export_point(self, point: PointRef, fmt: str, to: str) -> list[dict[str, Any]]:
        chosen = formats.export_format(fmt)
        disks = sorted(point.files.items())
        first = Path(to)
        paths = [
            first if i == 0 else first.with_name(f"{first.stem}-{disk}{first.suffix}")
            for i, (disk, _) in enumerate(disks)
        ]
        for path in paths:
            formats.check_new(path)
        written = []
        for (disk, name), path in zip(disks, paths, strict=True):
            image = self.replicas.point_image(self.site, point.item, disk, name)
            formats.write_image(image, "qcow2", path, chosen)
            written.append({"disk": disk, "path": str(path), "format": fmt,
                            "bytes": path.stat().st_blocks * 512})  # fmt: skip
        return written

    def adopt_vm(self, vm: Vm, item: str, seq: int) -> None:
        self.vms.stop_vm(self.site, vm)
        for disk in vm.disks:
            image = self.vms.disk_image(self.site, vm, disk.name)
            self.replicas.adopt(self.site, item, disk.name, seq, image)
        self.vms.delete_vm(self.site, vm)

    def set_inconsistent(self, vm: Vm, value: bool) -> None:
        self.vms.set_inconsistent(self.site, vm, value)

    def delete_vm(self, vm: Vm) -> None:
        self.vms.delete_vm(self.site, vm)

    def power(self, vm: Vm) -> VmPower:
        return self.vms.power(self.site, vm)

    def start_vm(self, vm: Vm) -> None:
        self.vms.start_vm(self.site, vm)

    def stop_vm(self, vm: Vm, *, timeout: float = 30.0) -> None:
        self.vms.stop_vm(self.site, vm, timeout=timeout)

    def guest_state(self, vm: Vm) -> dict[str, object]:
        return self.vms.guest_state(self.site, vm)

    # Replica chains ----------------------------------------------------------------

    def chain(self, item: str, disk: str) -> list[str]:
        return self.replicas.chain(self.site, item, disk)

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
        sealing = _sealing(transfer)  # checked before anything is opened
        if not resume:
            self.replicas.discard(self.site, item, disk)
        has_parent = bool(self.replicas.chain(self.site, item, disk))
        stack = ExitStack()
        try:
            device = stack.enter_context(self.replicas.begin(self.site, item, disk, seq, size))
        except BaseException:
            stack.close()
            raise

        def end(keep: bool) -> None:
            if keep:
                stack.close()  # flushes the partial point
                return
            with suppress(DiskError):  # a full disk cannot flush what is discarded anyway
                stack.close()
            self.replicas.discard(self.site, item, disk)

        return self._register(device, end, has_parent=has_parent, size=size, sealing=sealing)

    def _register(
        self,
        device: BlockDevice,
        end: Callable[[bool], None],
        *,
        has_parent: bool,
        size: int,
        sealing: tuple[SecretKey | None, bool] = (None, False),
    ) -> Receipt:
        """A receipt for ``device``: in this process, and on the wire port if
        any, with the key and compression of ``sealing`` (see :func:`_sealing`)."""
        ticket = secrets.token_urlsafe(24)
        with _RECEIVING_GUARD:
            _RECEIVING[ticket] = _Receiving(device, end)
        address = LOCAL + self.name
        cert = None
        if self.wire is not None:
            key, compress = sealing
            self.wire.register(ticket, device, key=key, compress=compress)
            address, cert = self.wire.address, self.wire.cert_pem
        return Receipt(ticket, address, cert, has_parent, size)

    def end_receive(self, receipt: Receipt, *, keep: bool) -> None:
        with _RECEIVING_GUARD:
            receiving = _RECEIVING.pop(receipt.ticket, None)
        if self.wire is not None:
            self.wire.unregister(receipt.ticket)
        if receiving is not None:
            receiving.end(keep)

    def seal(self, item: str, seq: int, disks: list[str]) -> dict[str, str]:
        return {disk: self.replicas.seal(self.site, item, disk, seq) for disk in disks}

    def discard(self, item: str, disk: str) -> None:
        self.replicas.discard(self.site, item, disk)

    def merge(self, item: str, disk: str, *, child: str, parent: str,
              grandchild: str | None) -> None:  # fmt: skip
        self.replicas.merge(self.site, item, disk, child=child, parent=parent,
                            grandchild=grandchild)  # fmt: skip

    def delete_chains(self, item: str, *, keep_for: list[Vm]) -> list[str]:
        needed = {path.name for vm in keep_for for path in self.vms.reads_through(self.site, vm)}
        return self.replicas.delete(self.site, item, keep=frozenset(needed))

    def space_free(self) -> int | None:
        return self.replicas.space_free(self.site)

    def location(self, item: str, disk: str) -> str:
        return self.replicas.location(self.site, item, disk)

    # Passes ------------------------------------------------------------------------

    def freeze(self, vms: list[Vm], tag: str, *, initial: bool, quiesce: bool) -> FrozenDisks:
        sessions = [self._session(vm, tag) for vm in vms]
        guests = [self.vms.guest(self.site, vm) if quiesce else None for vm in vms]
        paused = time.monotonic()
        tracking: dict[str, dict[str, str]] = {}
        with quiesced(guests, asked=quiesce) as outcomes:
            for vm, session in zip(vms, sessions, strict=True):
                tracking[vm.name] = _freeze_disks(session, vm, tag, initial)
        paused = time.monotonic() - paused
        for vm, (outcome, _) in zip(vms, outcomes, strict=True):
            if outcome.startswith(FREEZE_FAILED):
                log.warning("%s at site %s: %s; its point is crash-consistent",
                            vm.name, self.name, outcome)  # fmt: skip
        return FrozenDisks(
            tracking=tracking,
            seqs={vm.name: seq for vm, (_, seq) in zip(vms, outcomes, strict=True)},
            paused_seconds=round(paused, 4),
            quiesce={vm.name: outcome for vm, (outcome, _) in zip(vms, outcomes, strict=True)},
        )

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
        session = self._open(vm, tag)
        view = session.views.get(disk)
        if view is None:
            raise InternalError(detail=f"no frozen view '{tag}' of {vm.name}/{disk}: freeze first")
        chosen = (
            choose_mode(initial=initial, has_parent=receipt.has_parent, view=view)
            if mode is None
            else named_mode(mode, view)
        )
        with self._source_alive(vm, session), view.open() as raw, _target(receipt, transfer) as dst:
            caps = _Caps(raw, transfer, self._site_cap(transfer.site_max_rate), cancelled)
            counted = CountingDevice(caps.device)
            src: BlockDevice = counted
            if chosen is SyncMode.TRACKED and extra_dirty:
                src = UnionDirtyDevice(counted, [Extent(a, n) for a, n in extra_dirty])
            result = sync(
                src,
                dst,
                SyncOptions(
                    mode=chosen,
                    threads=transfer.threads,
                    resume_offset=resume,
                    target_is_blank=not receipt.has_parent,
                    checkpoint_every=CHECKPOINT_EVERY,
                ),
                progress=progress,
                checkpoint=checkpoint,
                cancelled=cancelled,
            )
            report = {
                **result.to_dict(),
                "mode": chosen.value,
                "source_bytes_read": counted.counts.bytes_read,
                **_wire_report(dst, transfer),
                **caps.report(),
            }
            if transfer.verify:
                report.update(integrity_proof(raw, dst, disk))
        return report

    def release(self, vm: Vm, tag: str, *, drop_older: bool, views: bool = False) -> None:
        with self._guard:
            session = self._sessions.get(vm.name)
            if session is None or session.tag != tag:
                return
            del self._sessions[vm.name]
        try:
            if drop_older:
                for name, tracker in session.trackers().items():
                    tracker.drop([b.name for b in tracker.bitmaps() if b.name != tag])
                    if name in session.views:
                        session.views[name].release()
            elif views:
                for view in session.views.values():
                    view.release()
        finally:
            session.stack.close()

    # Failback ------------------------------------------------------------------------

    def receive_disks(
        self, vm: Vm, *, blank: bool, transfer: Transfer | None = None
    ) -> dict[str, Receipt]:
        sealing = _sealing(transfer)  # checked before anything is opened
        stack = ExitStack()
        try:
            access = stack.enter_context(self.vms.disk_access(self.site, vm))
            devices = {
                d.name: stack.enter_context(access.open(d.name, writable=True)) for d in vm.disks
            }
        except BaseException:
            stack.close()
            raise
        open_tickets = set(devices)
        guard = threading.Lock()

        def end_of(disk: str) -> Callable[[bool], None]:
            def end(keep: bool) -> None:
                with suppress(DiskError):  # a flush that fails says so at the next read
                    devices[disk].flush()
                with guard:
                    open_tickets.discard(disk)
                    last = not open_tickets
                if last:
                    stack.close()

            return end

        return {
            disk: self._register(
                device, end_of(disk), has_parent=not blank, size=device.size, sealing=sealing
            )
            for disk, device in devices.items()
        }

    def written_since(self, vm: Vm, checkpoint: str, tag: str) -> dict[str, Extents] | None:
        with self.vms.disk_access(self.site, vm) as access:
            return views.written_since(access, checkpoint, tag)

    def freeze_view(
        self, vm: Vm, tag: str, *, since: Since, granularity: int | None = None
    ) -> FrozenView:
        session = self._session(vm, tag)
        frozen = views.freeze_view(session.access, tag, since, granularity)
        session.views = dict(frozen.views)
        return frozen.state

    def measure(self, vm: Vm, *, since: str | None) -> dict[str, Any]:
        with self.vms.disk_access(self.site, vm) as access:
            return views.measure(access, since)

    # Reading images --------------------------------------------------------------------

    def digests(self, image: Image, *, block: int | None = None) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        with open_image(self.vms, self.replicas, self.site, image) as (devices, _where):
            for disk, device in devices.items():
                if block is None:
                    found[disk] = {"size": device.size, "digest": disk_digest(device)}
                else:
                    hashed = block_digests(device, block)
                    found[disk] = {
                        "size": device.size,
                        "blocks": base64.b64encode(hashed.tobytes()).decode(),
                    }
        return found

    def check(self, image: Image) -> dict[str, Any]:
        with open_image(self.vms, self.replicas, self.site, image) as (devices, where):
            report = journal.check(list(devices.values()))
        return {**report.to_dict(), "where": where}

    # Bandwidth ---------------------------------------------------------------------

    def _site_cap(self, rate: int) -> TokenBucket | None:
        """The site's one bucket, at ``rate`` from now on (the latest transfer's
        cap: 0 lifts it for the transfers running too); None while there is no cap."""
        with self._guard:
            if self._site_bucket is None:
                if rate <= 0:
                    return None
                self._site_bucket = TokenBucket(rate, default_burst(rate))
            elif rate != self._site_bucket.rate:
                self._site_bucket.set_rate(rate)
            return self._site_bucket if rate > 0 else None

    # Sessions ----------------------------------------------------------------------

    def _session(self, vm: Vm, tag: str) -> _Session:
        """The VM's disk access for ``tag``, opened now unless it is open."""
        with self._guard:
            old = self._sessions.get(vm.name)
            if old is not None and old.tag == tag:
                return old
            if old is not None:
                del self._sessions[vm.name]
        if old is not None:
            old.stack.close()
        stack = ExitStack()
        try:
            access = stack.enter_context(self.vms.disk_access(self.site, vm))
        except BaseException:
            stack.close()
            raise
        session = _Session(tag, access, stack)
        with self._guard:
            self._sessions[vm.name] = session
        return session

    def _open(self, vm: Vm, tag: str) -> _Session:
        with self._guard:
            session = self._sessions.get(vm.name)
        if session is None or session.tag != tag:
            raise InternalError(detail=f"no open pass '{tag}' of '{vm.name}': freeze first")
        return session

    @contextmanager
    def _source_alive(self, vm: Vm, session: _Session) -> Iterator[None]:
        """Say so when a disk error comes from the VM's daemon having gone away."""
        try:
            yield
        except DiskError as e:
            if not (session.access.running and self.power(vm) is VmPower.STOPPED):
                raise
            raise DiskError(
                detail=f"the qemu-storage-daemon serving '{vm.name}' at site "
                f"'{self.name}' exited during the pass ({e}); no point was sealed: "
                "start the VM again, its next pass compares checksums"
            ) from e


def _libvirt() -> hosts.DomainHypervisor:
    """The hypervisor of the site's kvm hosts, made at the first call for one
    (libvirt-python is imported then: a site without a kvm host needs none)."""
    from siterecovery.providers.libvirt.hypervisor import LibvirtHypervisor

    return LibvirtHypervisor(virt_type=os.environ.get(VIRT_TYPE_ENV) or None)


def named_mode(mode: str, view: View) -> SyncMode:
    """A failback's mode: ``tracked`` needs the view's bitmap, else checksums."""
    chosen = SyncMode(mode)
    if chosen is SyncMode.TRACKED and not view.has_bitmap:
        return SyncMode.CHECKSUM
    return chosen


def choose_mode(*, initial: bool, has_parent: bool, view: View) -> SyncMode:
    if not has_parent:
        return SyncMode.FULL
    if initial:
        # A chain exists but this is a new protection: only differing blocks move.
        return SyncMode.CHECKSUM
    # Slow path: no trustworthy bitmap (VM crash, lost tracking) -> checksums.
    return SyncMode.TRACKED if view.has_bitmap else SyncMode.CHECKSUM


@contextmanager
def quiesced(
    guests: list[GuestAgent | None], *, asked: bool = True
) -> Iterator[list[tuple[str, int | None]]]:
    """Quiesce every guest (None: no guest tools), in order; thaw them all on exit.

    Yields per guest its outcome (``QUIESCED``, ``NOT_ASKED`` when not
    ``asked``, ``NO_GUEST_AGENT``, or ``freeze-failed: WHY``) and its last
    acknowledged record (None when not quiesced or not told). A guest whose
    freeze fails (GuestError: it refused, timed out, or its file systems
    cannot freeze) is left thawed and the others go on: its point is
    crash-consistent, the pass does not fail for it.
    """
    with ExitStack() as stack:
        outcomes: list[tuple[str, int | None]] = []
        for guest in guests:
            if guest is None:
                outcomes.append((NO_GUEST_AGENT if asked else NOT_ASKED, None))
                continue
            try:
                seq = guest.quiesce(timeout=QUIESCE_TIMEOUT)
            except GuestError as e:
                outcomes.append((quiesce_failed(e.message), None))
                continue
            stack.callback(guest.thaw)
            outcomes.append((QUIESCED, seq))
        yield outcomes


def _freeze_disks(session: _Session, vm: Vm, tag: str, initial: bool) -> dict[str, str]:
    """Views of every disk at one instant (one QMP transaction for all of them)."""
    trackers = session.trackers()
    found = {name: tracker.find_view(tag) for name, tracker in trackers.items()}
    if all(view is not None for view in found.values()):
        session.views = {name: view for name, view in found.items() if view}
        return dict.fromkeys(trackers, "resumed")
    reasons = {}
    requests = []
    for name, tracker in trackers.items():
        tracker.cleanup_views(keep_tags=(tag,))
        if initial:
            # A lost view of an initial sync (the VM restarted): start over; its
            # bitmap, kept by a clean stop, would clash with the new one.
            tracker.drop([tag])
        bitmaps = tracker.bitmaps()
        reasons[name] = tracking_state(initial, bitmaps)
        since = [b.name for b in bitmaps] if reasons[name] == "bitmap" else []
        requests.append((tracker, since))
    views = session.access.freeze(requests, tag, new_checkpoint=tag)
    session.views = dict(zip(trackers, views, strict=True))
    return reasons


def tracking_state(initial: bool, bitmaps: list[BitmapState]) -> str:
    """Why a pass can (``bitmap``) or cannot trust change tracking."""
    if initial:
        return "initial"
    if any(b.inconsistent for b in bitmaps):
        # The VM stopped uncleanly: its bitmaps may miss writes.
        return "inconsistent-bitmap"
    return "bitmap" if bitmaps else "no-bitmap"


def _throttled(device: BlockDevice, max_rate: int, cancelled: Callable[[], bool] | None) -> Any:
    """The bandwidth cap; its waits end early when the pass is cancelled."""
    if max_rate <= 0:
        return device
    return RateLimitedDevice(device, max_rate, interrupt=cancelled)


class _Caps:
    """A transfer's source read through its item's cap, then through its site's
    shared bucket (each only if set); both waits end early on a cancel."""

    def __init__(
        self,
        raw: BlockDevice,
        transfer: Transfer,
        site: TokenBucket | None,
        cancelled: Callable[[], bool] | None,
    ) -> None:
        self.transfer = transfer
        self.item = _throttled(raw, transfer.max_rate, cancelled)
        self.site = None
        if site is not None:
            self.site = RateLimitedDevice(self.item, site.rate, bucket=site, interrupt=cancelled)
        self.device: BlockDevice = self.item if self.site is None else self.site

    def report(self) -> dict[str, Any]:
        """The caps applied and the seconds this transfer slept on each."""
        item = self.item.waited_seconds if isinstance(self.item, RateLimitedDevice) else 0.0
        site = 0.0 if self.site is None else self.site.waited_seconds
        return {
            "max_rate": self.transfer.max_rate,
            "site_max_rate": self.transfer.site_max_rate,
            "throttled_seconds": round(item, 3),
            "site_throttled_seconds": round(site, 3),
        }


def transfer_key(transfer: Transfer) -> SecretKey | None:
    """The key a transfer is sealed with (None: TLS only); its material is
    the transfer's, handed by the engine for this transfer only."""
    if transfer.key is None:
        return None
    if not transfer.key_material:
        raise InternalError(detail=f"the transfer names key '{transfer.key}' without its material")
    try:
        material = bytes.fromhex(transfer.key_material)
    except ValueError:
        raise InternalError(detail=f"the material of key '{transfer.key}' is not hex") from None
    return SecretKey(transfer.key, datetime.now(UTC), material)


def _sealing(transfer: Transfer | None) -> tuple[SecretKey | None, bool]:
    """The key and compression a receipt's ticket is registered with."""
    if transfer is None:
        return None, False
    return transfer_key(transfer), transfer.compress


def _wire_report(dst: BlockDevice, transfer: Transfer) -> dict[str, Any]:
    """What went on the wire: sealed, compressed and its bytes (headers
    included), or False, False, 0 for a receipt of this process."""
    if not isinstance(dst, RemoteDevice):
        return {"sealed": False, "compressed": False, "bytes_on_wire": 0}
    return {
        "sealed": transfer.key is not None,
        "compressed": transfer.compress,
        "bytes_on_wire": dst.counts.bytes_sent,
    }


@contextmanager
def _target(receipt: Receipt, transfer: Transfer) -> Iterator[BlockDevice]:
    """The device a receipt opens: in this process, or a wire connection."""
    if receipt.address.startswith(LOCAL):
        with _RECEIVING_GUARD:
            receiving = _RECEIVING.get(receipt.ticket)
        if receiving is None:
            raise InternalError(detail=f"receipt for {receipt.address} is closed")
        yield receiving.device
        return
    device = RemoteDevice.connect(
        receipt.address,
        size=receipt.size,
        job=receipt.ticket[:16],
        key=transfer_key(transfer),
        compress=transfer.compress,
        tls=client_context(receipt.cert_pem) if receipt.cert_pem else None,
        ticket=receipt.ticket,
    )
    try:
        yield device
        device.flush()
    finally:
        device.close()
