"""A site whose data plane is an agent on another machine, reached over HTTPS.

Every :class:`~siterecovery.sites.base.SiteAgent` method is one call of the
agent's control API (``POST /v1/call/site.METHOD``, pinned TLS, the site's
secret as bearer token; ``agent/client.py``); the agent runs it with its own
:class:`~siterecovery.sites.local.InProcessAgent` (``agent/site_ops.py``).
A transfer is a streaming call: the source agent reports progress and
checkpoints as events while the bytes go from agent to agent; the engine's
cancel check is read at every event and closes the stream, which stops the
agent at its next one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from siterecovery.agent.client import AgentClient
from siterecovery.domain.errors import AgentUnreachable, SiteRecoveryError, SyncCancelled
from siterecovery.domain.model import Host, Vm, VmPower
from siterecovery.sites.base import (
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
    vm_from_dict,
    vm_to_dict,
)


class RemoteAgent:
    """:class:`~siterecovery.sites.base.SiteAgent` over a site agent's API."""

    def __init__(self, name: str, client: AgentClient) -> None:
        self.name = name
        self.client = client

    def _call(self, method: str, **args: Any) -> Any:
        return self.client.call("site." + method, **args)

    # The site --------------------------------------------------------------------

    def info(self) -> SiteInfo:
        try:
            found = self.client.info()
        except SiteRecoveryError as e:
            return SiteInfo(
                site=self.name, version="", reachable=False, url=self.client.url, error=e.code
            )
        return SiteInfo(
            site=found.site,
            version=found.version,
            reachable=True,
            url=self.client.url,
            clock_offset=round(found.clock_offset, 4),
            round_trip=round(found.round_trip, 4),
        )

    def prepare(self, *, storage: str = "block") -> None:
        self._call("prepare", storage=storage)

    def storage(self) -> str:
        return str(self._call("storage"))

    # VMs -------------------------------------------------------------------------

    def create_vm(
        self, vm: Vm, *, point: PointRef | None = None, checkpoint: str | None = None
    ) -> None:
        self._call(
            "create_vm", vm=vm_to_dict(vm), point=None if point is None else point.to_dict(),
            checkpoint=checkpoint,
        )  # fmt: skip

    def replace_disks(self, vm: Vm) -> None:
        self._call("replace_disks", vm=vm_to_dict(vm))

    def adopt_vm(self, vm: Vm, item: str, seq: int) -> None:
        self._call("adopt_vm", vm=vm_to_dict(vm), item=item, seq=seq)

    def set_inconsistent(self, vm: Vm, value: bool) -> None:
        self._call("set_inconsistent", vm=vm_to_dict(vm), value=value)

    def delete_vm(self, vm: Vm) -> None:
        self._call("delete_vm", vm=vm_to_dict(vm))

    def add_host(self, host: Host) -> list[str]:
        return [str(s) for s in self._call("add_host", host=host.to_dict())]

    def discover(self, host: Host) -> list[dict[str, Any]]:
        return [dict(d) for d in self._call("discover", host=host.to_dict())]

    def import_vm(self, vm: Vm, files: list[str]) -> Vm:
        return vm_from_dict(self._call("import_vm", vm=vm_to_dict(vm), files=files))

    def export_point(self, point: PointRef, fmt: str, to: str) -> list[dict[str, Any]]:
        found = self._call("export_point", point=point.to_dict(), fmt=fmt, to=to)
        return [dict(f) for f in found]

    def adopt_domain(self, host: Host, name: str) -> Vm:
        return vm_from_dict(self._call("adopt_domain", host=host.to_dict(), name=name))

    def power(self, vm: Vm) -> VmPower:
        return VmPower(self._call("power", vm=vm_to_dict(vm)))

    def start_vm(self, vm: Vm) -> None:
        self._call("start_vm", vm=vm_to_dict(vm))

    def stop_vm(self, vm: Vm, *, timeout: float = 30.0) -> None:
        self._call("stop_vm", vm=vm_to_dict(vm), timeout=timeout)

    def guest_state(self, vm: Vm) -> dict[str, object]:
        return dict(self._call("guest_state", vm=vm_to_dict(vm)))

    # Replica chains ----------------------------------------------------------------

    def chain(self, item: str, disk: str) -> list[str]:
        return [str(n) for n in self._call("chain", item=item, disk=disk)]

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
        found = self._call("receive_point", item=item, disk=disk, seq=seq, size=size,
                           resume=resume, transfer=_transfer(transfer))  # fmt: skip
        return Receipt.from_dict(found)

    def end_receive(self, receipt: Receipt, *, keep: bool) -> None:
        self._call("end_receive", receipt=receipt.to_dict(), keep=keep)

    def seal(self, item: str, seq: int, disks: list[str]) -> dict[str, str]:
        return {str(k): str(v) for k, v in self._call("seal", item=item, seq=seq,
                                                      disks=disks).items()}  # fmt: skip

    def discard(self, item: str, disk: str) -> None:
        self._call("discard", item=item, disk=disk)

    def merge(self, item: str, disk: str, *, child: str, parent: str,
              grandchild: str | None) -> None:  # fmt: skip
        self._call("merge", item=item, disk=disk, child=child, parent=parent,
                   grandchild=grandchild)  # fmt: skip

    def delete_chains(self, item: str, *, keep_for: list[Vm]) -> list[str]:
        kept = self._call("delete_chains", item=item, keep_for=[vm_to_dict(v) for v in keep_for])
        return [str(name) for name in kept]

    def space_free(self) -> int | None:
        found = self._call("space_free")
        return None if found is None else int(found)

    def location(self, item: str, disk: str) -> str:
        return f"{self._call('location', item=item, disk=disk)} (agent {self.client.url})"

    # Passes ------------------------------------------------------------------------

    def freeze(self, vms: list[Vm], tag: str, *, initial: bool, quiesce: bool) -> FrozenDisks:
        found = self._call("freeze", vms=[vm_to_dict(v) for v in vms], tag=tag,
                           initial=initial, quiesce=quiesce)  # fmt: skip
        return FrozenDisks.from_dict(found)

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
        def on_event(event: dict[str, Any]) -> None:
            if "progress" in event and progress is not None:
                done, total = event["progress"]
                progress(int(done), int(total))
            if "checkpoint" in event and checkpoint is not None:
                checkpoint(int(event["checkpoint"]))
            if cancelled is not None and cancelled():
                raise SyncCancelled(what=f"the transfer of {vm.name}/{disk}")

        result = self.client.stream(
            "site.send_disk", on_event, vm=vm_to_dict(vm), disk=disk, tag=tag,
            receipt=receipt.to_dict(), transfer=transfer.to_dict(), initial=initial,
            resume=resume, mode=mode,
            extra_dirty=None if extra_dirty is None else [list(e) for e in extra_dirty],
        )  # fmt: skip
        return dict(result)

    def release(self, vm: Vm, tag: str, *, drop_older: bool, views: bool = False) -> None:
        try:
            self._call("release", vm=vm_to_dict(vm), tag=tag, drop_older=drop_older, views=views)
        except AgentUnreachable:
            if drop_older or views:
                raise
            # Closing after a failure: the agent closes its session itself at
            # the next freeze of this VM.

    # Failback ------------------------------------------------------------------------

    def receive_disks(
        self, vm: Vm, *, blank: bool, transfer: Transfer | None = None
    ) -> dict[str, Receipt]:
        found = self._call("receive_disks", vm=vm_to_dict(vm), blank=blank,
                           transfer=_transfer(transfer))  # fmt: skip
        return {str(disk): Receipt.from_dict(r) for disk, r in found.items()}

    def written_since(self, vm: Vm, checkpoint: str, tag: str) -> dict[str, Extents] | None:
        found = self._call("written_since", vm=vm_to_dict(vm), checkpoint=checkpoint, tag=tag)
        if found is None:
            return None
        return {str(d): [(int(a), int(n)) for a, n in extents] for d, extents in found.items()}

    def freeze_view(
        self, vm: Vm, tag: str, *, since: Since, granularity: int | None = None
    ) -> FrozenView:
        found = self._call("freeze_view", vm=vm_to_dict(vm), tag=tag, since=since.to_dict(),
                           granularity=granularity)  # fmt: skip
        return FrozenView.from_dict(found)

    def measure(self, vm: Vm, *, since: str | None) -> dict[str, Any]:
        return dict(self._call("measure", vm=vm_to_dict(vm), since=since))

    # Reading images --------------------------------------------------------------------

    def digests(self, image: Image, *, block: int | None = None) -> dict[str, dict[str, Any]]:
        found = self._call("digests", image=image.to_dict(), block=block)
        return {str(disk): dict(d) for disk, d in found.items()}

    def check(self, image: Image) -> dict[str, Any]:
        return dict(self._call("check", image=image.to_dict()))


def _transfer(transfer: Transfer | None) -> dict[str, Any] | None:
    """A transfer as a call's argument: its key material goes to the agent over
    the authenticated channel (the body of a pinned-TLS call), never in a log."""
    return None if transfer is None else transfer.to_dict()
