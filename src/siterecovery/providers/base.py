"""The provider interface: what a site's hypervisor and storage must offer.

A provider is the data plane of the sites that use it, in two halves: a
:class:`Hypervisor` (VMs, guest agent, disk access and change tracking) and a
:class:`~siterecovery.providers.replicas.ReplicaStore` (recovery-point
chains), each with its contract suite (``tests/providers/``). The ``local``
provider (embedded default) is a directory per site, a qemu-storage-daemon per
running VM and a guest workload process; later ones (libvirt, page blobs)
implement the same protocols, and may pair differently (a libvirt hypervisor
with a page-blob store). Providers are registered by name in :data:`PROVIDERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from siterecovery.disk.tracking import DiskAccess
from siterecovery.domain.model import Site, Vm, VmPower
from siterecovery.providers.replicas import ReplicaStore


class GuestAgent(Protocol):
    """The guest-tools channel of a running VM (quiesce for app-consistent points)."""

    def quiesce(self, timeout: float = 60.0) -> int | None:
        """Flush and pause guest writes (an app-consistent instant); the last
        acknowledged record's seq when the guest tells it (the lab's workloads),
        None when it does not (a plain qemu-guest-agent). GuestError when the
        guest cannot quiesce; nothing stays paused then."""
        ...

    def thaw(self) -> None:
        """Resume guest writes. Idempotent."""
        ...

    def status(self) -> dict[str, Any]: ...


class Hypervisor(Protocol):
    """What runs a site's VMs: define them (blank, or on a point of the site's
    replica store), start, stop, delete, power, the guest agent, and block
    access to their disks with change tracking (``disk_access``: a
    :class:`~siterecovery.disk.tracking.DiskAccess`, whatever serves them).

    Methods are idempotent where they say so and thread-safe per VM. It is
    used inside one site (an agent, or the embedded default's process): the
    paths it takes and gives never cross to another site.
    """

    kind: str

    def create_vm(
        self,
        site: Site,
        vm: Vm,
        *,
        bases: dict[str, Path] | None = None,
        checkpoint: str | None = None,
    ) -> None:
        """Create the VM's definition and disks. Idempotent.

        Disks are blank, or, for a disk named in ``bases``, an overlay on that
        image (a point of the replica store: nothing is copied). ``checkpoint``
        starts change tracking on every new disk from its first write.
        """
        ...

    def replace_disks(self, site: Site, vm: Vm) -> None:
        """Give a stopped VM new blank disks."""
        ...

    def add_checkpoint(self, site: Site, vm: Vm, checkpoint: str) -> None:
        """Start change tracking on a stopped VM's disks."""
        ...

    def delete_vm(self, site: Site, vm: Vm) -> None:
        """Stop the VM if running and delete its definition and disks. Idempotent."""
        ...

    def start_vm(self, site: Site, vm: Vm) -> None:
        """Start the VM (disks served, workload running). Idempotent.

        Raises VmInconsistent when the VM's disks hold an interrupted sync.
        """
        ...

    def stop_vm(self, site: Site, vm: Vm, *, timeout: float = 30.0) -> None:
        """Stop cleanly (guest flushed, change tracking kept consistent). Idempotent."""
        ...

    def power(self, site: Site, vm: Vm) -> VmPower: ...

    def disk_access(self, site: Site, vm: Vm) -> AbstractContextManager[DiskAccess]:
        """Access to the VM's disks, whether it runs or not."""
        ...

    def guest(self, site: Site, vm: Vm) -> GuestAgent | None:
        """The guest agent of a running VM with guest tools, else None."""
        ...

    def guest_state(self, site: Site, vm: Vm) -> dict[str, object]:
        """What the guest last reported, readable while it is stopped: at least
        ``seq`` (its last acknowledged record) when it has guest tools; {} if not."""
        ...

    def is_inconsistent(self, site: Site, vm: Vm) -> bool:
        """Whether the VM's disks hold an interrupted sync (it must not start)."""
        ...

    def set_inconsistent(self, site: Site, vm: Vm, value: bool) -> None:
        """Mark or clear the interrupted-sync marker, durably, before returning.
        A failback marks its target before writing it and clears it only after
        the integrity proof; :meth:`start_vm` refuses a marked VM."""
        ...

    def disk_image(self, site: Site, vm: Vm, disk: str) -> Path:
        """The image of the VM's disk (for the replica store to adopt it)."""
        ...

    def reads_through(self, site: Site, vm: Vm) -> set[Path]:
        """The images the VM's disks read through (their bases), which must
        outlive the VM's replica chains."""
        ...


class Provider(Protocol):
    """The data plane of the sites that use it: a hypervisor for their VMs and a
    replica store for their recovery-point chains."""

    kind: str

    @property
    def hypervisor(self) -> Hypervisor: ...

    @property
    def replicas(self) -> ReplicaStore: ...

    def prepare_site(self, site: Site, *, storage: str = "block") -> None:
        """Create the site's storage layout. Idempotent.

        ``storage`` is the kind of disk storage (``block``, or ``managed`` for
        storage without block access: its disks cannot fail back).
        """
        ...

    def storage(self, site: Site) -> str:
        """The kind of the site's disk storage (see :meth:`prepare_site`)."""
        ...

    def run_dir(self, site: Site, key: str) -> Path:
        """A short private directory for unix sockets (paths are limited to 107 bytes)."""
        ...


def _methods(protocol: type) -> tuple[str, ...]:
    return tuple(
        name
        for name in vars(protocol)
        if not name.startswith("_") and callable(vars(protocol)[name])
    )


HYPERVISOR_METHODS = _methods(Hypervisor)
REPLICA_METHODS = _methods(ReplicaStore)
PROVIDER_METHODS = ("prepare_site", "storage", "run_dir")
"""Every method of the protocols: a provider must have them all, and so must
its hypervisor and its replica store (nothing optional is reached by
``getattr``, so no safety marker can be silently skipped)."""


def check_provider(name: str, provider: object) -> None:
    """Refuse a provider that lacks a method of the protocols (InternalError)."""
    from siterecovery.domain.errors import InternalError

    missing = [m for m in PROVIDER_METHODS if not callable(getattr(provider, m, None))]
    halves = (("hypervisor", HYPERVISOR_METHODS), ("replicas", REPLICA_METHODS))
    for half, methods in halves:
        part = getattr(provider, half, None)
        missing += [f"{half}.{m}" for m in methods if not callable(getattr(part, m, None))]
    if missing:
        raise InternalError(detail=f"provider '{name}' lacks {', '.join(missing)}")


ProviderFactory = Callable[[], Provider]
PROVIDERS: dict[str, ProviderFactory] = {}


def register(name: str) -> Callable[[ProviderFactory], ProviderFactory]:
    def wrap(factory: ProviderFactory) -> ProviderFactory:
        PROVIDERS[name] = factory
        return factory

    return wrap


BUILTIN = ("siterecovery.providers.local.provider",)


def load_builtins() -> None:
    """Import the built-in providers so that they register themselves."""
    import importlib

    for module in BUILTIN:
        importlib.import_module(module)


def iter_provider_names() -> Iterator[str]:
    load_builtins()
    yield from sorted(PROVIDERS)
