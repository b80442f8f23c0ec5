"""Replication groups and recovery plans: the multi-VM model (pure, no I/O).

A **replication group** keeps its members consistent with each other: every
``common_interval`` seconds one *common point* is taken for all of them at the
same instant (every member quiesced, every member's new checkpoint started,
then released). Between common points each member keeps its own points.
A member never fails over alone.

A **recovery plan** fails many VMs over (and back) in order: ordered *boot
groups* (group 1 starts first; VMs of one group start in parallel), each with
*actions* before and after it: a script run with a timeout, or a manual step
that pauses the plan's job until someone resumes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from siterecovery.domain.errors import AlreadyExists, GroupTooLarge, InvalidInput
from siterecovery.domain.model import iso
from siterecovery.domain.values import check_name

MAX_GROUP_SIZE = 16
"""Members of one replication group. Taking a common point pauses every member
until the last one's disks are frozen (one QMP transaction per VM, one after
the other), so the pause grows with the group; ASR caps groups at 16 VMs and
so do we (docs/ARCHITECTURE.md gives the measured pause per member)."""

MAX_ACTION_TIMEOUT = 24 * 3600.0
MAX_BOOT_GROUPS = 32


@dataclass(frozen=True, slots=True)
class ReplicationGroup:
    name: str
    members: tuple[str, ...]
    created: datetime
    common_interval: float = 300.0
    """Seconds between two common points (0: only on demand)."""
    next_seq: int = 1
    last_common: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "members": list(self.members),
            "created": iso(self.created),
            "common_interval": self.common_interval,
            "last_common": iso(self.last_common),
        }

    def with_members(self, members: list[str]) -> ReplicationGroup:
        if len(members) > MAX_GROUP_SIZE:
            raise GroupTooLarge(group=self.name, size=len(members), limit=MAX_GROUP_SIZE)
        return replace(self, members=tuple(members))

    def common_id(self, seq: int) -> str:
        return f"{self.name}-c{seq:06d}"


class ActionKind(StrEnum):
    SCRIPT = "script"
    MANUAL = "manual"


class ActionWhen(StrEnum):
    BEFORE = "before"
    AFTER = "after"


@dataclass(frozen=True, slots=True)
class Action:
    """A step of a plan around one boot group.

    ``script``: ``command`` runs under ``/bin/sh -c`` on the engine's machine with
    ``timeout`` seconds; a non-zero exit or a timeout stops the plan. ``manual``:
    the job pauses (``awaiting-action``) showing ``instructions`` until resumed.
    """

    name: str
    kind: ActionKind
    when: ActionWhen
    command: str | None = None
    instructions: str | None = None
    timeout: float = 300.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind.value,
            "when": self.when.value,
            "command": self.command,
            "instructions": self.instructions,
            "timeout": self.timeout,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Action:
        return cls(
            name=data["name"],
            kind=ActionKind(data["kind"]),
            when=ActionWhen(data["when"]),
            command=data.get("command"),
            instructions=data.get("instructions"),
            timeout=float(data.get("timeout", 300.0)),
        )


def make_action(
    *,
    name: str,
    kind: str,
    when: str,
    command: str | None,
    instructions: str | None,
    timeout: float,
) -> Action:
    """An action from user input, validated (InvalidInput says what to change)."""
    check_name("action", name)
    kinds, whens = [k.value for k in ActionKind], [w.value for w in ActionWhen]
    if kind not in kinds:
        raise InvalidInput(field="kind", reason=f"'{kind}' is not one of {kinds}")
    if when not in whens:
        raise InvalidInput(field="when", reason=f"'{when}' is not one of {whens}")
    if kind == ActionKind.SCRIPT and not (command or "").strip():
        raise InvalidInput(field="command", reason="a script action needs a command to run")
    if kind == ActionKind.MANUAL and command:
        raise InvalidInput(field="command", reason="a manual action runs no command")
    if not 0 < timeout <= MAX_ACTION_TIMEOUT:
        raise InvalidInput(field="timeout", reason=f"{timeout} is not in (0, 86400] seconds")
    return Action(name, ActionKind(kind), ActionWhen(when), command, instructions, timeout)


@dataclass(frozen=True, slots=True)
class BootGroup:
    vms: tuple[str, ...] = ()
    actions: tuple[Action, ...] = ()

    def before(self) -> list[Action]:
        return [a for a in self.actions if a.when is ActionWhen.BEFORE]

    def after(self) -> list[Action]:
        return [a for a in self.actions if a.when is ActionWhen.AFTER]

    def to_dict(self) -> dict[str, Any]:
        return {"vms": list(self.vms), "actions": [a.to_dict() for a in self.actions]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BootGroup:
        return cls(
            vms=tuple(data.get("vms") or ()),
            actions=tuple(Action.from_dict(a) for a in data.get("actions") or ()),
        )


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    name: str
    created: datetime
    groups: tuple[BootGroup, ...] = field(default_factory=tuple)
    description: str = ""

    @property
    def vms(self) -> list[str]:
        """Every VM of the plan, in boot order."""
        return [vm for group in self.groups for vm in group.vms]

    def group_of(self, vm: str) -> int | None:
        """The 1-based boot group of ``vm``, or None."""
        for index, group in enumerate(self.groups, start=1):
            if vm in group.vms:
                return index
        return None

    def with_vms(self, index: int, vms: list[str]) -> RecoveryPlan:
        """The plan with ``vms`` added to boot group ``index`` (created if it is the next)."""
        groups = self._grown(index)
        for vm in vms:
            check_name("vm", vm)
            where = self.group_of(vm)
            if where is not None:
                raise InvalidInput(
                    field="vms",
                    reason=f"'{vm}' is already in boot group {where} of plan '{self.name}'; "
                    f"remove it first (`siterecovery plan remove {self.name} {vm}`)",
                )
        target = groups[index - 1]
        groups[index - 1] = replace(target, vms=target.vms + tuple(dict.fromkeys(vms)))
        return replace(self, groups=tuple(groups))

    def without_vm(self, vm: str) -> RecoveryPlan:
        groups = [replace(g, vms=tuple(v for v in g.vms if v != vm)) for g in self.groups]
        return replace(self, groups=tuple(groups))

    def with_action(self, index: int, action: Action) -> RecoveryPlan:
        groups = self._grown(index)
        target = groups[index - 1]
        if any(a.name == action.name for a in target.actions):
            raise AlreadyExists(kind=f"action of boot group {index}", name=action.name)
        groups[index - 1] = replace(target, actions=(*target.actions, action))
        return replace(self, groups=tuple(groups))

    def _grown(self, index: int) -> list[BootGroup]:
        groups = list(self.groups)
        if not 1 <= index <= len(groups) + 1 or index > MAX_BOOT_GROUPS:
            raise InvalidInput(
                field="group",
                reason=f"boot group {index} does not exist; use 1..{len(groups) + 1}",
            )
        if index == len(groups) + 1:
            groups.append(BootGroup())
        return groups

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created": iso(self.created),
            "description": self.description,
            "groups": [{"index": i, **g.to_dict()} for i, g in enumerate(self.groups, start=1)],
            "vms": self.vms,
        }
