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

from siterecovery.domain.errors import GuestError, HypervisorError, VmNotFound

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

    def define_network(self, xml: str, *, start: bool = True) -> str:
        """Define a persistent network from XML (started when ``start``); its name."""
        with translated(self.uri, "define a network"):
            net = self._raw.networkDefineXML(xml)
            if start:
                net.create()
            return str(net.name())


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
        try:
            capacity, _allocation, _physical = self._raw.blockInfo(target, 0)
        except libvirt.libvirtError:
            return None
        return int(capacity)

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
