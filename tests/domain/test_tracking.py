"""An item's tracking: typed state, its JSON (schema 1) and what older vaults wrote (schema 0)."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

import pytest

from siterecovery.domain.errors import InternalError
from siterecovery.domain.tracking import (
    SCHEMA,
    DrillState,
    FailoverState,
    ItemTracking,
    LastCheckpoint,
    PendingMerge,
    ResumeState,
)

FAILOVER = FailoverState(
    kind="planned",
    to="cloud",
    came_from="onprem",
    point="web01-000003",
    host="hv02",
    source_checkpoint="fo1a2b3c4d",
    target_checkpoint="c0123456789",
)

FULL = ItemTracking(
    home="onprem",
    hosts={"onprem": "hv01", "cloud": "hv02"},
    kinds={"onprem": "local", "cloud": "local"},
    next_seq=4,
    last_pass={"d0": {"mode": "tracked", "tracking": "bitmap", "bytes_written": 65536}},
    last_quiesce="freeze-failed: the guest agent did not answer",
    last_checkpoint=LastCheckpoint(point="web01-000003", tag="c0123456789", site="onprem"),
    resume=ResumeState("j1", {"d0": 8 << 20, "d1": 0}),
    pending_merges=(PendingMerge("cloud", "d0", "p000002.qcow2", "p000001.qcow2", None),),
    failover=FAILOVER,
    failback_tags={"p1": "p1a2b3c4d", "p2": "p2a2b3c4d", "fd": "fda2b3c4d"},
    drill=DrillState(vm="web01-test", site="cloud", point="web01-000003", job="j9"),
    pinned=("web01-000003",),
)

# What an engine before the schema wrote for an item failed over once, with a
# retention merge recorded before sites were agents and a retired key.
SCHEMA_0: dict[str, Any] = {
    "home": "onprem",
    "hosts": {"onprem": "hv01", "cloud": "hv02"},
    "kinds": {"onprem": "local"},
    "next_seq": 4,
    "resume": None,
    "last_pass": {"d0": {"mode": "tracked", "tracking": "bitmap", "seconds": 1.5}},
    "last_checkpoint": {"point": "web01-000003", "tag": "c0123456789", "site": "onprem"},
    "pending_merges": [
        {
            "dir": "/v/sites/cloud/replicas/web01/d0",
            "child": "p2",
            "parent": "p1",
            "grandchild": None,
        },
    ],
    "failover": FAILOVER.to_json(),
    "failback_tags": None,
    "drill": None,
    "pinned": [],
    "busy": "j0123456789abcdef",
}


def test_a_full_state_survives_its_json() -> None:
    data = FULL.to_json()
    assert data["schema"] == SCHEMA == 2
    assert ItemTracking.from_json(data) == FULL


def test_defaults_are_not_written() -> None:
    assert ItemTracking().to_json() == {"schema": 2}
    assert ItemTracking.from_json({"schema": 1}) == ItemTracking()  # schema 1: no new key
    assert ItemTracking.from_json(None) == ItemTracking.from_json({}) == ItemTracking()
    cleared = replace(FULL, resume=None, pending_merges=(), drill=None, pinned=(), next_seq=1)
    assert set(cleared.to_json()) == {
        "schema", "home", "hosts", "kinds", "last_pass", "last_quiesce", "last_checkpoint",
        "failover", "failback_tags",
    }  # fmt: skip


def test_nested_shapes_are_those_of_schema_0() -> None:
    # `item show` returns failover and drill as they are stored: same keys, same order.
    assert list(FAILOVER.to_json()) == [
        "kind", "to", "came_from", "point", "host", "source_checkpoint", "target_checkpoint",
    ]  # fmt: skip
    assert FULL.to_json()["drill"] == {
        "vm": "web01-test", "site": "cloud", "point": "web01-000003", "job": "j9",
    }  # fmt: skip
    assert FULL.to_json()["resume"] == {"tag": "j1", "offsets": {"d0": 8 << 20, "d1": 0}}


def test_schema_0_is_read_as_it_is() -> None:
    read = ItemTracking.from_json(SCHEMA_0)
    assert read.home == "onprem" and read.hosts["cloud"] == "hv02" and read.next_seq == 4
    assert read.last_pass == SCHEMA_0["last_pass"]
    assert read.last_checkpoint == LastCheckpoint("web01-000003", "c0123456789", "onprem")
    assert read.failover == FAILOVER
    assert (read.resume, read.drill, read.failback_tags, read.pinned) == (None, None, {}, ())
    # The chain directory names the disk; the site is the item's standby (the caller's).
    assert read.pending_merges == (PendingMerge(None, "d0", "p2", "p1", None),)


def test_schema_0_is_written_back_with_the_same_keys_and_shapes() -> None:
    """Only ``schema`` is added; null and empty values (absent, as before) and
    unknown keys are dropped."""
    written = ItemTracking.from_json(SCHEMA_0).to_json()
    kept = {k: v for k, v in SCHEMA_0.items() if v not in (None, []) and k != "busy"}
    kept["pending_merges"] = [
        {"site": None, "disk": "d0", "child": "p2", "parent": "p1", "grandchild": None}
    ]
    assert written == {"schema": SCHEMA, **kept}
    assert ItemTracking.from_json(written) == ItemTracking.from_json(SCHEMA_0)


def test_a_resume_without_offsets_has_none() -> None:
    assert ItemTracking.from_json({"resume": {"tag": "j1"}}).resume == ResumeState("j1", {})


def test_unknown_keys_are_read_and_dropped() -> None:
    read = ItemTracking.from_json({"schema": 1, "next_seq": 2, "busy": "j1", "later": [1]})
    assert read == ItemTracking(next_seq=2)
    assert read.to_json() == {"schema": SCHEMA, "next_seq": 2}


@pytest.mark.parametrize("schema", [SCHEMA + 1, 99])
def test_a_newer_schema_is_refused(schema: int) -> None:
    with pytest.raises(InternalError, match=f"schema {schema}, newer than this engine reads"):
        ItemTracking.from_json({"schema": schema, "next_seq": 2})


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"schema": "1"}, "schema"),
        ({"next_seq": "2"}, "next_seq"),
        ({"hosts": ["hv01"]}, "hosts"),
        ({"pinned": "web01-000001"}, "pinned"),
        ({"drill": {"vm": "web01-test", "site": "cloud"}}, "drill.point"),
        ({"failover": {**FAILOVER.to_json(), "kind": "sideways"}}, "failover.kind"),
        ({"resume": {"tag": "j1", "offsets": {"d0": "8M"}}}, "resume.offsets.d0"),
    ],
)
def test_a_malformed_value_is_named(data: dict[str, Any], named: str) -> None:
    with pytest.raises(InternalError, match=f"malformed: {named} is"):
        ItemTracking.from_json(data)


def test_fields_are_checked_and_frozen() -> None:
    with pytest.raises(TypeError, match="next_sq"):
        replace(FULL, next_sq=5)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        FULL.next_seq = 5  # type: ignore[misc]
