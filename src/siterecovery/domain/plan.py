"""Operation plans: what an operation will do and which preconditions fail.

Every refusable operation first builds a :class:`Plan` by running its checks.
``--dry-run`` returns the plan as it is; a real run raises the first failed
check's error before any side effect, so both read the same rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from siterecovery.domain.errors import SiteRecoveryError


@dataclass(frozen=True, slots=True)
class Check:
    """One precondition: passed, or refused with the error that says why."""

    name: str
    error: SiteRecoveryError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "ok": self.ok}
        if self.error is not None:
            body.update(code=self.error.code, message=self.error.message)
        return body


def check(name: str, rule: Callable[[], None]) -> Check:
    """Run ``rule``; a SiteRecoveryError it raises becomes a failed check."""
    try:
        rule()
    except SiteRecoveryError as error:
        return Check(name, error)
    return Check(name)


@dataclass
class Plan:
    operation: str
    vm: str
    source: str | None = None
    target: str | None = None
    point: dict[str, Any] | None = None
    sync: str | None = None
    host: str | None = None
    bytes_to_move: int = 0
    bytes_note: str = ""
    will_create: list[str] = field(default_factory=list)
    will_delete: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the user asked that the operation will not do as they may think."""
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, rule: Callable[[], None]) -> bool:
        result = check(name, rule)
        self.checks.append(result)
        return result.ok

    def raise_first(self) -> None:
        for result in self.checks:
            if result.error is not None:
                raise result.error

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": True,
            "operation": self.operation,
            "vms": [self.vm],
            "direction": f"{self.source} -> {self.target}" if self.source else None,
            "point": self.point,
            "sync": self.sync,
            "host": self.host,
            "bytes_to_move": self.bytes_to_move,
            "bytes_note": self.bytes_note,
            "will_create": self.will_create,
            "will_delete": self.will_delete,
            "notes": self.notes,
            "preconditions": [c.to_dict() for c in self.checks],
            "failed_preconditions": [c.to_dict() for c in self.checks if not c.ok],
            "ok": self.ok,
        }
