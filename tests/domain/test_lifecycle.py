"""The lifecycle table: each state allows exactly its operations; refusals say what is allowed."""

from __future__ import annotations

import pickle

import pytest

from siterecovery.domain.errors import (
    Category,
    OperationNotAllowed,
    SiteRecoveryError,
    VmNotFound,
    all_error_classes,
    category_of,
)
from siterecovery.domain.lifecycle import ALLOWED, ItemState, Operation, allowed, require


def test_every_state_has_an_entry() -> None:
    assert set(ALLOWED) == set(ItemState)


@pytest.mark.parametrize(
    ("state", "operation", "ok"),
    [
        (ItemState.PROTECTED, Operation.UNPLANNED_FAILOVER, True),
        (ItemState.PROTECTED, Operation.PROTECT, False),
        (ItemState.ENABLING, Operation.REPLICATE, False),
        (ItemState.FAILED_OVER, Operation.COMMIT, True),
        (ItemState.FAILED_OVER, Operation.REPROTECT, False),
        (ItemState.COMMITTED, Operation.REPROTECT, True),
        (ItemState.AWAITING_COMPLETION, Operation.COMPLETE, True),
        (ItemState.SYNCING, Operation.DISABLE, False),
        (ItemState.INCONSISTENT, Operation.PLANNED_FAILOVER, True),
        (ItemState.DISABLED, Operation.PROTECT, True),
        (ItemState.DISABLED, Operation.REPLICATE, False),
    ],
)
def test_require(state: ItemState, operation: Operation, ok: bool) -> None:
    if ok:
        require(state, operation, vm="web01")
        return
    with pytest.raises(OperationNotAllowed) as refused:
        require(state, operation, vm="web01")
    assert refused.value.code == "OPERATION_NOT_ALLOWED"
    assert state.value in refused.value.message
    for name in allowed(state):
        assert name in refused.value.message


def test_codes_are_unique_and_categorised() -> None:
    codes = [cls.code for cls in all_error_classes()]
    assert len(codes) == len(set(codes))
    assert category_of("VM_NOT_FOUND") is Category.NOT_FOUND
    assert category_of("ALREADY_PROTECTED") is Category.RULE
    assert category_of("INVALID_INPUT") is Category.USAGE
    assert category_of("NO_SUCH_CODE") is Category.INTERNAL


def test_errors_survive_pickling_for_durable_jobs() -> None:
    error: SiteRecoveryError = pickle.loads(pickle.dumps(VmNotFound(name="web01", site="cloud")))
    assert isinstance(error, VmNotFound)
    assert error.to_dict()["code"] == "VM_NOT_FOUND"
    assert "cloud" in error.message


def test_group_member_never_fails_over_alone() -> None:
    from siterecovery.domain.errors import GroupMemberAlone
    from siterecovery.domain.lifecycle import require_group_together

    require_group_together("web01", None, whole_group=False)
    require_group_together("web01", "app", whole_group=True)
    with pytest.raises(GroupMemberAlone) as refused:
        require_group_together("web01", "app", whole_group=False)
    assert refused.value.code == "GROUP_MEMBER_ALONE" and "app" in refused.value.message
