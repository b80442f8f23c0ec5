"""The replicated-item lifecycle: states, operations, and what each state allows.

::

    enabling ──► protected(A→B) ──failover──► failed-over ──commit──► committed
        ▲            │  ▲                        │   ▲ (re-run with       │
        │            │  └──────reverse replicate─┼───┼── another point)   │
     protect      disable                        │   │                    │
        │            ▼                           ▼   │               reprotect
     disabled ◄── (any stable state)       (planned failover:             │
                                            syncing → awaiting-completion ▼
                                            → finalizing)            reprotecting
                                                                          │
                                                                          ▼
                                                                   protected(B→A)

A cancelled or failed data sync leaves the target ``inconsistent``: it refuses
to start, and re-running the failover resumes the sync.

The table :data:`ALLOWED` is the single source of truth for which operation a
state allows; :func:`require` raises :class:`OperationNotAllowed` for anything
else, before any side effect.
"""

from __future__ import annotations

from enum import StrEnum

from siterecovery.domain.errors import OperationNotAllowed


class ItemState(StrEnum):
    ENABLING = "enabling"
    PROTECTED = "protected"
    FAILED_OVER = "failed-over"
    COMMITTED = "committed"
    REPROTECTING = "reprotecting"
    SYNCING = "syncing"
    AWAITING_COMPLETION = "awaiting-completion"
    FINALIZING = "finalizing"
    INCONSISTENT = "inconsistent"
    DISABLED = "disabled"


class Operation(StrEnum):
    PROTECT = "protect"
    TEST_FAILOVER = "test-failover"
    CLEANUP_TEST = "cleanup-test"
    PLANNED_FAILOVER = "planned-failover"
    UNPLANNED_FAILOVER = "unplanned-failover"
    COMPLETE = "complete"
    COMMIT = "commit"
    REPROTECT = "reprotect"
    DISABLE = "disable"
    REPLICATE = "replicate"


_S = ItemState
_O = Operation

ALLOWED: dict[ItemState, frozenset[Operation]] = {
    _S.ENABLING: frozenset({_O.DISABLE}),
    _S.PROTECTED: frozenset(
        {
            _O.TEST_FAILOVER,
            _O.CLEANUP_TEST,
            _O.PLANNED_FAILOVER,
            _O.UNPLANNED_FAILOVER,
            _O.DISABLE,
            _O.REPLICATE,
        }
    ),
    _S.FAILED_OVER: frozenset({_O.UNPLANNED_FAILOVER, _O.COMMIT}),
    _S.COMMITTED: frozenset({_O.REPROTECT, _O.PLANNED_FAILOVER, _O.DISABLE}),
    _S.REPROTECTING: frozenset({_O.DISABLE}),
    _S.SYNCING: frozenset(),
    _S.AWAITING_COMPLETION: frozenset({_O.COMPLETE}),
    _S.FINALIZING: frozenset(),
    _S.INCONSISTENT: frozenset({_O.PLANNED_FAILOVER, _O.DISABLE}),
    _S.DISABLED: frozenset({_O.PROTECT}),
}


def allowed(state: ItemState) -> list[str]:
    """The operations ``state`` allows, sorted (for messages and the portal)."""
    return sorted(op.value for op in ALLOWED[state])


def require(state: ItemState, operation: Operation, *, vm: str) -> None:
    """Raise :class:`OperationNotAllowed` unless ``state`` allows ``operation``."""
    if operation not in ALLOWED[state]:
        raise OperationNotAllowed(
            operation=operation.value,
            vm=vm,
            state=state.value,
            allowed=", ".join(allowed(state)) or "nothing (an operation is in progress)",
        )


def require_group_together(vm: str, group: str | None, *, whole_group: bool) -> None:
    """A replication-group member never fails over alone (the seed's rule).

    ``whole_group`` is true when the request fails every member of ``group``
    over together (a recovery plan holding them all).
    """
    from siterecovery.domain.errors import GroupMemberAlone

    if group is not None and not whole_group:
        raise GroupMemberAlone(vm=vm, group=group)
