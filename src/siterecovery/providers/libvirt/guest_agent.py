"""The guest agent of a running libvirt domain, as a :class:`GuestAgent`.

Quiesce is libvirt's ``fsFreeze`` (qemu-guest-agent's ``guest-fsfreeze-freeze``:
the standard protocol, any Linux or Windows guest with qemu-ga or its VSS
provider), thaw is ``fsThaw``. The last acknowledged record comes from
``sr-status``, a command only the lab guest's agent has (the journal
workload's status). A production guest answers the freeze and thaw and not
``sr-status``: its quiesce returns None (quiesced, no record seq claimed), and
its points are app-consistent all the same. Whether the guest has
``sr-status`` is read once from ``guest-info`` (its supported commands),
never guessed from an error.

Every ``sr-status`` seen is also written to ``guest.json`` in the VM's
directory, so that :meth:`LibvirtHypervisor.guest_state` can tell the last
acknowledged record while the VM is stopped.

Thread safety: libvirt serializes agent commands per domain; one object may be
used from several threads, but a quiesce and a thaw should not race.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt  # type: ignore[import-untyped, import-not-found, unused-ignore]

from siterecovery.domain.errors import GuestError, VmNotFound
from siterecovery.keys.master import write_private
from siterecovery.providers.libvirt.connection import Domain, translated

STATUS_COMMAND = "sr-status"
PING_TIMEOUT = 5


class LibvirtGuestAgent:
    """The agent of one domain; ``domain_of()`` looks the domain up afresh at each
    call (the connection may have been reopened since), ``state_file`` is where
    the last ``sr-status`` seen is kept."""

    def __init__(
        self, domain_of: Callable[[], Domain], state_file: Path, *, has_status: bool
    ) -> None:
        self._domain_of = domain_of
        self._state_file = state_file
        self.has_status = has_status

    @classmethod
    def probe(
        cls, domain: Domain, domain_of: Callable[[], Domain], state_file: Path
    ) -> LibvirtGuestAgent | None:
        """The agent of a running ``domain`` when one answers ``guest-info``, else None."""
        try:
            info = domain.agent_command("guest-info", timeout=PING_TIMEOUT)
        except GuestError:
            return None
        commands = {c.get("name") for c in (info or {}).get("supported_commands", [])}
        return cls(domain_of, state_file, has_status=STATUS_COMMAND in commands)

    def quiesce(self, timeout: float = 60.0) -> int | None:
        """Freeze the guest's file systems (the lab guest: its workload pauses after
        the record in flight, flushed); the last acknowledged seq, None for a
        guest without ``sr-status``.
        A freeze that does not answer within ``timeout`` s is thawed and raises
        GuestError."""
        domain = self._domain_of()
        try:
            with _response_timeout(domain, timeout):
                domain.fs_freeze()
        except GuestError:
            with contextlib.suppress(Exception):
                domain.fs_thaw()
            raise
        status = self._status(domain)
        return None if status is None else int(status["seq"])

    def thaw(self) -> None:
        """Thaw the file systems; nothing to do when none is frozen or the domain is
        off or gone. Idempotent."""
        try:
            domain = self._domain_of()
        except VmNotFound:
            return
        if domain.state() == "shutoff":
            return
        domain.fs_thaw()

    def status(self) -> dict[str, Any]:
        """``sr-status`` (``seq``, ``seed``, ``paused``...) when the guest has it, with
        ``fsfreeze`` (``frozen``/``thawed``); ``paused`` is the freeze state otherwise."""
        domain = self._domain_of()
        frozen = domain.agent_command("guest-fsfreeze-status", timeout=PING_TIMEOUT)
        status = self._status(domain) or {"paused": frozen == "frozen"}
        return {**status, "fsfreeze": frozen}

    def _status(self, domain: Domain) -> dict[str, Any] | None:
        if not self.has_status:
            return None
        status: dict[str, Any] = domain.agent_command(STATUS_COMMAND, timeout=PING_TIMEOUT)
        save_state(self._state_file, status, source=STATUS_COMMAND)
        return status


@contextlib.contextmanager
def _response_timeout(domain: Domain, seconds: float) -> Iterator[None]:
    """libvirt's agent response timeout for this domain set to ``seconds`` while
    inside (libvirt's default blocks until the agent answers), then its default."""
    action = f"set the guest agent timeout of domain '{domain.name}'"
    with translated(domain.uri, action, domain=domain.name):
        domain.raw.agentSetResponseTimeout(max(1, round(seconds)), 0)
    try:
        yield
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            domain.raw.agentSetResponseTimeout(libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT, 0)


def save_state(path: Path, status: dict[str, Any], **extra: object) -> None:
    """Write ``status`` (with ``extra`` and the time) to ``path``, atomically."""
    data = {**status, **extra, "at": time.time()}
    write_private(path, (json.dumps(data) + "\n").encode(), durable=False)


def read_state(path: Path) -> dict[str, object]:
    """What :func:`save_state` last wrote, or {}."""
    try:
        data: dict[str, object] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data
