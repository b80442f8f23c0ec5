"""A typed wrapper over libvirt-python: the one place its errors are translated.

:func:`connect` opens a connection by URI (``qemu:///system``,
``qemu+ssh://host/system``, ``qemu+unix:///system?socket=PATH``...);
:class:`Connection` and :class:`Domain` offer the few calls the provider
makes, each turning ``libvirt.libvirtError`` into the error tree:

- a domain that does not exist -> :class:`~siterecovery.domain.errors.VmNotFound`;
- the guest agent not answering or refusing -> :class:`GuestError`;
- anything else (connection refused, daemon gone, XML refused) ->
  :class:`HypervisorError`, naming the URI and what was asked.

Importing this module installs a process-wide libvirt error handler that
drops libvirt's own printing to stderr (the errors still raise).

Thread safety: a libvirt connection may be shared by threads (libvirt locks
it); callbacks and events are not used here, so no event loop is needed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import libvirt  # type: ignore[import-untyped, import-not-found, unused-ignore]
import libvirt_qemu  # type: ignore[import-untyped, import-not-found, unused-ignore]

from siterecovery.domain.errors import BitmapInconsistent, GuestError, HypervisorError, VmNotFound

CONNECT_HINT = (
    "check that libvirtd runs on that host and that the URI is right "
    "(socket path, or ssh user and key for qemu+ssh)"
)
STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}
"""libvirt's domain states by the names ``virsh domstate`` prints."""
_CONNECTION_LOST = (
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_AUTH_FAILED,
    libvirt.VIR_ERR_INVALID_CONN,
)
_AGENT_ERRORS = (
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
    libvirt.VIR_ERR_AGENT_UNSYNCED,
    libvirt.VIR_ERR_OPERATION_TIMEOUT,
)
_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)


def _quiet(_context: object, _error: object) -> None:
    """libvirt's error callback: errors raise as exceptions, nothing is printed."""


libvirt.registerErrorHandler(_quiet, None)


@contextlib.contextmanager
def translated(
    uri: str, action: str, *, domain: str | None = None, agent: bool = False
) -> Iterator[None]:
    """Run a libvirt call, its ``libvirtError`` raised as an error of the tree.

    ``agent``: the call goes to the guest agent, whose error replies libvirt
    reports as internal errors: those are the guest's (GuestError). A domain
    that is not running stays a HypervisorError (nothing to wait for)."""
    try:
        yield
    except libvirt.libvirtError as error:
        raise _translate(error, uri, action, domain, agent) from error


def _translate(error: Any, uri: str, action: str, domain: str | None, agent: bool) -> Exception:
    code = error.get_error_code()
    detail = str(error.get_error_message() or error)
    if code == libvirt.VIR_ERR_NO_DOMAIN and domain is not None:
        return VmNotFound(name=domain)
    if code in _AGENT_ERRORS or (agent and code == libvirt.VIR_ERR_INTERNAL_ERROR):
        return GuestError(detail=f"{action} on {uri}: {detail}")
    hint = CONNECT_HINT if code in _CONNECTION_LOST else ""
    return HypervisorError(uri=uri, action=action, detail=detail, hint=hint)


def connect(uri: str) -> Connection:
    """Open a read-write connection to ``uri``; HypervisorError when it cannot."""
    with translated(uri, "connect"):
        raw = libvirt.open(uri)
    if raw is None:  # Old bindings returned None instead of raising.
        raise HypervisorError(uri=uri, action="connect", detail="no connection", hint=CONNECT_HINT)
    return Connection(uri, raw)


class Connection:
    """An open libvirt connection (close it, or use it as a context manager)."""

    def __init__(self, uri: str, raw: Any) -> None:
        self.uri = uri
        self._raw = raw

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection. Idempotent; never raises."""
        raw, self._raw = self._raw, None
        with contextlib.suppress(libvirt.libvirtError, AttributeError):
            raw.close()

    @property
    def raw(self) -> Any:
        """The ``libvirt.virConnect`` underneath, for calls not wrapped yet."""
        return self._raw

    def capabilities(self) -> str:
        """The host's capabilities XML (the first call after a daemon start probes
        qemu: seconds)."""
        with translated(self.uri, "read the host capabilities"):
            return str(self._raw.getCapabilities())

    def hostname(self) -> str:
        with translated(self.uri, "read the host name"):
            return str(self._raw.getHostname())

    def domains(self) -> list[Domain]:
        """Every domain the host knows: defined (persistent) and running transient ones."""
        with translated(self.uri, "list domains"):
            return [Domain(self.uri, raw) for raw in self._raw.listAllDomains(0)]

    def domain(self, name: str) -> Domain:
        """The domain called ``name``; VmNotFound when there is none."""
        with translated(self.uri, f"find domain '{name}'", domain=name):
            return Domain(self.uri, self._raw.lookupByName(name))

    def define(self, xml: str) -> Domain:
        """Define (or redefine, same name and UUID) a persistent domain from XML."""
        with translated(self.uri, "define a domain"):
            return Domain(self.uri, self._raw.defineXML(xml))

    def network_xmls(self) -> list[str]:
        """The XML of every network the host defines, active or not."""
        with translated(self.uri, "list networks"):
            return [str(net.XMLDesc(0)) for net in self._raw.listAllNetworks(0)]

    def define_network(self, xml: str, *, start: bool = True, autostart: bool = False) -> str:
        """Define a persistent network from XML (started when ``start``, and at
        every start of the daemon when ``autostart``); its name."""
        with translated(self.uri, "define a network"):
            net = self._raw.networkDefineXML(xml)
            if autostart:
                net.setAutostart(1)
            if start:
                net.create()
            return str(net.name())

    def start_network(self, name: str) -> None:
        """Start the defined network ``name`` unless it runs. Idempotent."""
        with translated(self.uri, f"start network '{name}'"):
            net = self._raw.networkLookupByName(name)
            if not net.isActive():
                net.create()

    def destroy_everything(self, *, undefine: bool = False) -> None:
        """Power off every domain and stop every network of the host (a private
        host being stopped); with ``undefine``, forget the domains as well. A
        domain or network that refuses is left, the others are done all the same."""
        with translated(self.uri, "list domains"):
            domains = self._raw.listAllDomains(0)
            networks = self._raw.listAllNetworks(0)
        for domain in domains:
            with contextlib.suppress(libvirt.libvirtError):
                if domain.isActive():
                    domain.destroy()
            if undefine:
                with contextlib.suppress(libvirt.libvirtError):
                    domain.undefineFlags(_UNDEFINE_FLAGS)
        for network in networks:
            with contextlib.suppress(libvirt.libvirtError):
                if network.isActive():
                    network.destroy()


class Domain:
    """One libvirt domain (``virDomain``), looked up on a :class:`Connection`."""

    def __init__(self, uri: str, raw: Any) -> None:
        self.uri = uri
        self._raw = raw
        self.name = str(raw.name())

    @contextlib.contextmanager
    def _call(self, action: str, *, agent: bool = False) -> Iterator[None]:
        what = f"{action} of domain '{self.name}'"
        with translated(self.uri, what, domain=self.name, agent=agent):
            yield

    @property
    def raw(self) -> Any:
        """The ``libvirt.virDomain`` underneath, for calls not wrapped yet."""
        return self._raw

    def xml(self, *, inactive: bool = False) -> str:
        """The domain's XML: live (running config) or, with ``inactive``, the
        persistent definition the next boot uses."""
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        with self._call("read the XML"):
            return str(self._raw.XMLDesc(flags))

    def state(self) -> str:
        """The state as ``virsh domstate`` names it (``running``, ``shutoff``...)."""
        with self._call("read the state"):
            state, _reason = self._raw.state(0)
        return STATES.get(state, "nostate")

    def persistent(self) -> bool:
        with self._call("read persistence"):
            return bool(self._raw.isPersistent())

    def disk_capacity(self, target: str) -> int | None:
        """The virtual size in bytes of the disk at ``target`` (``vda``), or None when
        libvirt cannot tell (image missing, network disk of a stopped domain)."""
        info = self._block_info(target)
        return None if info is None else info[0]

    def disk_allocation(self, target: str) -> int | None:
        """Bytes of the disk at ``target`` backed by storage (a qcow2: its
        highest allocated offset; libvirt's ``allocation``), or None when unknown."""
        info = self._block_info(target)
        return None if info is None else info[1]

    def _block_info(self, target: str) -> tuple[int, int, int] | None:
        try:
            capacity, allocation, physical = self._raw.blockInfo(target, 0)
        except libvirt.libvirtError:
            return None
        return int(capacity), int(allocation), int(physical)

    def start(self) -> None:
        """Boot a defined, stopped domain."""
        with self._call("start"):
            self._raw.create()

    def shutdown(self, *, agent: bool = False) -> None:
        """Ask the guest to power off (ACPI power button, or with ``agent`` the guest
        agent's ``guest-shutdown``); returns at once, the guest decides when."""
        mode = "agent" if agent else "ACPI"
        flags = (
            libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT
            if agent
            else libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN
        )
        with self._call(f"shut down ({mode})", agent=agent):
            self._raw.shutdownFlags(flags)

    def destroy(self) -> None:
        """Power off at once (pull the plug). A domain already off is left alone."""
        with self._call("destroy"):
            if self._raw.isActive():
                self._raw.destroy()

    def undefine(self) -> None:
        """Remove the definition with its snapshot and checkpoint metadata and
        NVRAM; the disk images stay. A running domain becomes transient."""
        with self._call("undefine"):
            self._raw.undefineFlags(_UNDEFINE_FLAGS)

    def agent_command(self, command: str, timeout: int = 10, **arguments: Any) -> Any:
        """The ``return`` of one guest-agent command (through libvirt's channel);
        GuestError when the agent does not answer within ``timeout`` s or refuses."""
        request: dict[str, Any] = {"execute": command}
        request |= {"arguments": arguments} if arguments else {}
        with self._call(f"guest agent '{command}'", agent=True):
            reply = libvirt_qemu.qemuAgentCommand(self._raw, json.dumps(request), timeout, 0)
        return json.loads(reply).get("return")

    def fs_freeze(self) -> int:
        """Freeze the guest's file systems through its agent; how many it froze."""
        with self._call("freeze file systems", agent=True):
            return int(self._raw.fsFreeze(None, 0))

    def fs_thaw(self) -> int:
        """Thaw the guest's file systems; how many it thawed (0 when none was frozen)."""
        with self._call("thaw file systems", agent=True):
            return int(self._raw.fsThaw(None, 0))

    def create_checkpoint(self, xml: str) -> str:
        """Create a checkpoint (a dirty bitmap on each disk) from XML; its name."""
        with self._call("create a checkpoint"):
            return str(self._raw.checkpointCreateXML(xml, 0).getName())

    def checkpoints(self) -> list[str]:
        """Names of the domain's checkpoints, oldest first."""
        with self._call("list checkpoints"):
            found = self._raw.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
            return [str(checkpoint.getName()) for checkpoint in found]

    def checkpoint_tree(self) -> list[tuple[str, str | None]]:
        """Every checkpoint as ``(name, parent name or None)``, parents before
        their children."""
        with self._call("list checkpoints"):
            found = self._raw.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
            return [(str(c.getName()), _parent_name(c)) for c in found]

    def checkpoint_xml(self, name: str, *, size: bool = False) -> str | None:
        """The XML of checkpoint ``name`` (None when it does not exist); with
        ``size``, each disk's ``size`` attribute: bytes changed since it (a
        running domain only: libvirt asks qemu)."""
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_XML_SIZE if size else 0
        with self._call(f"read checkpoint '{name}'"):
            checkpoint = self._checkpoint(name)
            return None if checkpoint is None else str(checkpoint.getXMLDesc(flags))

    def delete_checkpoint(self, name: str, *, metadata_only: bool = False) -> None:
        """Delete checkpoint ``name`` and its bitmaps (an older checkpoint's
        bitmap still covers every change since it). ``metadata_only`` forgets
        it without touching the images: for a checkpoint whose bitmap qemu lost
        (libvirt refuses the full delete then). Idempotent."""
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY if metadata_only else 0
        with self._call(f"delete checkpoint '{name}'"):
            checkpoint = self._checkpoint(name)
            if checkpoint is not None:
                checkpoint.delete(flags)

    def _checkpoint(self, name: str) -> Any:
        try:
            return self._raw.checkpointLookupByName(name, 0)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                return None
            raise

    def backup_begin(self, backup_xml: str, checkpoint_xml: str | None = None) -> None:
        """Start a backup job (``virDomainBackupBegin``); with ``checkpoint_xml``,
        that checkpoint is created at the same instant. One job per domain (a
        second waits ~30 s for libvirt's job lock, then fails: check
        :meth:`backup_xml` first). An incremental backup from a checkpoint
        whose bitmap is broken raises BitmapInconsistent."""
        try:
            self._raw.backupBegin(backup_xml, checkpoint_xml, 0)
        except libvirt.libvirtError as error:
            if error.get_error_code() == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT:
                raise BitmapInconsistent(disk=self.name, checkpoint="") from error
            raise _translate(error, self.uri, "begin a backup", self.name, False) from error

    def backup_xml(self) -> str | None:
        """The XML of the domain's active backup job, or None when there is none."""
        try:
            return str(self._raw.backupGetXMLDesc(0))
        except libvirt.libvirtError as error:
            if error.get_error_code() in _NO_JOB:
                return None
            raise _translate(error, self.uri, "read the backup job", self.name, False) from error

    def abort_job(self) -> bool:
        """Abort the domain's active job (a backup ends, its NBD exports go
        away); False when no job was active. Idempotent."""
        try:
            self._raw.abortJob()
        except libvirt.libvirtError as error:
            if error.get_error_code() in _NO_JOB:
                return False
            raise _translate(error, self.uri, "abort the job", self.name, False) from error
        return True


_NO_JOB = (libvirt.VIR_ERR_NO_DOMAIN_BACKUP, libvirt.VIR_ERR_OPERATION_INVALID)
"""What libvirt says when a domain has no backup job (or no job to abort)."""


def _parent_name(checkpoint: Any) -> str | None:
    try:
        return str(checkpoint.getParent(0).getName())
    except libvirt.libvirtError as error:
        if error.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return None
        raise
