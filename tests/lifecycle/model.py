"""What the state machine expects of one replicated item: a model of its state
and of the facts its operations' preconditions read, and the prediction of
whether an operation is accepted or, if not, with which error code.

The prediction reads the lifecycle table (``ALLOWED``) for the state and the
documented rules (docs/ARCHITECTURE.md, *Rules*) for the rest; it never asks
the daemon. Where two preconditions fail at once and the docs do not order
them, the prediction names both codes (the machine checks separately that the
daemon answers the same code every time for the same situation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from siterecovery.domain.lifecycle import ALLOWED, ItemState, Operation

SITES = ("onprem", "cloud")
WAITING_STATES = (ItemState.AWAITING_COMPLETION,)

OPS = (
    "protect",
    "replicate",
    "test-failover",
    "cleanup-test",
    "planned-failover",
    "unplanned-failover",
    "commit",
    "complete",
    "cancel",
    "reprotect",
    "disable",
)
"""The operations the machine drives (``planned-failover`` of a committed or
inconsistent item is the failback)."""

_LIFECYCLE = {
    "protect": Operation.PROTECT,
    "replicate": Operation.REPLICATE,
    "test-failover": Operation.TEST_FAILOVER,
    "cleanup-test": Operation.CLEANUP_TEST,
    "planned-failover": Operation.PLANNED_FAILOVER,
    "unplanned-failover": Operation.UNPLANNED_FAILOVER,
    "commit": Operation.COMMIT,
    "reprotect": Operation.REPROTECT,
    "disable": Operation.DISABLE,
}


def other(site: str) -> str:
    return SITES[1 - SITES.index(site)]


@dataclass
class Model:
    """One VM and its item as the machine believes them to be."""

    vm: str
    state: ItemState | None = None
    active: str = "onprem"
    """Where the VM runs: the item's active site (the VM's site before protection)."""
    home: str | None = None
    """The site protection began at (kept for the item's whole life)."""
    copies: set[str] = field(default_factory=lambda: {"onprem"})
    """The sites where the inventory holds a VM of this name."""
    marked: set[str] = field(default_factory=set)
    """The sites whose copy holds an interrupted sync (marked inconsistent)."""
    points: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {s: [] for s in SITES})
    drill: bool = False
    waiting: str | None = None
    """The failback job paused in awaiting-completion."""
    last_job: str | None = None
    last_error: bool = False
    """The item records a failed pass or job (observed: it makes replication unhealthy)."""

    @property
    def standby(self) -> str:
        return other(self.active)

    def recovery_site(self) -> str:
        """Where a failover starts the VM and reads its points (services/failover.py)."""
        return self.active if self.state is ItemState.FAILED_OVER else self.standby

    def allows(self, op: str) -> bool:
        assert self.state is not None
        return _LIFECYCLE[op] in ALLOWED[self.state]

    def allowed_operations(self) -> list[str]:
        """What the item's ``allowed_operations`` must list (replicate is not a user's
        lifecycle operation: services/protection.py leaves it out)."""
        assert self.state is not None
        return sorted(op.value for op in ALLOWED[self.state] - {Operation.REPLICATE})

    def select(self, selector: str) -> dict[str, Any] | None:
        """The point a failover with ``selector`` would use, if any."""
        points = self.points[self.recovery_site()]
        if selector == "latest":
            return points[-1] if points else None
        if selector == "latest-app-consistent":
            app = [p for p in points if p["type"] == "app-consistent"]
            return app[-1] if app else None
        return next((p for p in points if p["id"] == selector), None)

    def is_failback(self) -> bool:
        return self.state in (ItemState.COMMITTED, ItemState.INCONSISTENT)

    def reverse_healthy(self) -> bool:
        return bool(self.points[self.standby]) and not self.last_error


def refusal(m: Model, op: str, *, point: str = "latest", create_vm: bool = False) -> set[str]:
    """The error codes ``op`` may be refused with; empty when it must be accepted."""
    if op == "protect":
        if m.state not in (None, ItemState.DISABLED):
            return {"ALREADY_PROTECTED"}
        if len(m.copies) > 1:
            return {"VM_COPY_AT_TARGET"}  # a failover's copy lingers at the target site
        return set()
    if op in ("complete", "cancel"):
        if m.waiting is not None:
            return set()
        if m.last_job is None:
            return {"JOB_NOT_FOUND"}
        return {"OPERATION_NOT_ALLOWED"} if op == "complete" else {"JOB_FINISHED"}
    if m.state is None:
        return {"ITEM_NOT_FOUND"}
    if op == "cleanup-test":
        codes = set() if m.allows(op) else {"OPERATION_NOT_ALLOWED"}
        return codes if m.drill else codes | {"NO_TEST_FAILOVER"}
    if op in ("replicate", "disable") and not m.allows(op):
        return {"OPERATION_NOT_ALLOWED"}
    if op == "disable":
        return {"TEST_FAILOVER_ACTIVE"} if m.drill else set()  # clean the drill up first
    if op == "replicate":
        return set()
    if not m.allows(op):
        if m.state is ItemState.DISABLED:
            return {"PROTECTION_DISABLED"}
        if m.state is ItemState.FAILED_OVER and op == "planned-failover":
            return {"FAILOVER_NOT_COMMITTED"}
        return {"OPERATION_NOT_ALLOWED"}
    return _plan_rules(m, op, point=point, create_vm=create_vm)


def _plan_rules(m: Model, op: str, *, point: str, create_vm: bool) -> set[str]:
    """The first failing rule of a plan whose state check passed (services/failover.py order)."""
    toward_home = m.state is ItemState.PROTECTED and m.standby == m.home
    if op == "test-failover":
        if m.drill:
            return {"TEST_FAILOVER_ACTIVE"}
        return set() if m.select(point) else {"NO_RECOVERY_POINT"}
    if op == "unplanned-failover":
        if m.select(point) is None:
            return {"NO_RECOVERY_POINT"}
        return {"REPLICATION_UNHEALTHY"} if toward_home and not m.reverse_healthy() else set()
    if op in ("planned-failover", "reprotect") and m.active not in m.copies:
        return {"FAILED_OVER_VM_MISSING"}
    if op == "planned-failover" and m.is_failback():
        return set() if create_vm or m.standby in m.copies else {"TARGET_VM_MISSING"}
    if op == "planned-failover" and toward_home and not m.reverse_healthy():
        return {"REPLICATION_UNHEALTHY"}
    return set()


STATUS = {
    "INVALID_INPUT": 400,
    "VM_COPY_AT_TARGET": 409,
    "ITEM_NOT_FOUND": 404,
    "JOB_NOT_FOUND": 404,
    "POINT_NOT_FOUND": 404,
}
"""HTTP status of a refusal by code (the rest are rules: 409)."""


def status_of(code: str) -> int:
    return STATUS.get(code, 409)
