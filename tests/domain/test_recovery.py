"""The multi-VM model: group size limit, boot groups, actions (pure, no I/O)."""

from __future__ import annotations

import pytest

from siterecovery.domain.errors import AlreadyExists, GroupTooLarge, InvalidInput
from siterecovery.domain.model import utcnow
from siterecovery.domain.recovery import (
    MAX_GROUP_SIZE,
    ActionWhen,
    RecoveryPlan,
    ReplicationGroup,
    make_action,
)


def test_a_group_holds_at_most_the_limit() -> None:
    group = ReplicationGroup("g", (), utcnow())
    full = group.with_members([f"vm{i}" for i in range(MAX_GROUP_SIZE)])
    assert len(full.members) == MAX_GROUP_SIZE == 16
    with pytest.raises(GroupTooLarge) as refused:
        group.with_members([f"vm{i}" for i in range(MAX_GROUP_SIZE + 1)])
    assert refused.value.code == "GROUP_TOO_LARGE" and "17" in refused.value.message
    assert group.common_id(7) == "g-c000007"


def test_boot_groups_open_in_order_and_hold_a_vm_once() -> None:
    plan = RecoveryPlan("p", utcnow()).with_vms(1, ["web01", "web02"]).with_vms(2, ["db01"])
    assert plan.vms == ["web01", "web02", "db01"]
    assert plan.group_of("db01") == 2 and plan.group_of("nope") is None
    with pytest.raises(InvalidInput):
        plan.with_vms(4, ["x"])  # groups are 1..N+1
    with pytest.raises(InvalidInput, match="already in boot group 1"):
        plan.with_vms(2, ["web01"])
    assert plan.without_vm("web02").vms == ["web01", "db01"]


def test_actions_are_validated_and_named_once_per_group() -> None:
    script = make_action(
        name="warm", kind="script", when="before", command="true", instructions=None, timeout=5
    )
    manual = make_action(
        name="dns", kind="manual", when="after", command=None, instructions="do it", timeout=60
    )
    plan = RecoveryPlan("p", utcnow()).with_vms(1, ["a"]).with_action(1, script)
    plan = plan.with_action(1, manual)
    assert [a.name for a in plan.groups[0].before()] == ["warm"]
    assert [a.when for a in plan.groups[0].after()] == [ActionWhen.AFTER]
    with pytest.raises(AlreadyExists):
        plan.with_action(1, script)
    bad = [
        {"kind": "script", "when": "before", "command": None},
        {"kind": "manual", "when": "before", "command": "rm -rf /"},
        {"kind": "webhook", "when": "before", "command": "x"},
        {"kind": "script", "when": "during", "command": "x"},
    ]
    for fields in bad:
        with pytest.raises(InvalidInput):
            make_action(name="a", instructions=None, timeout=5, **fields)
    with pytest.raises(InvalidInput):
        make_action(name="a", kind="script", when="before", command="x", instructions=None,
                    timeout=0)  # fmt: skip
    restored = RecoveryPlan("p", utcnow(), plan.groups).groups[0].actions
    assert [type(a).from_dict(a.to_dict()) for a in restored] == list(restored)
