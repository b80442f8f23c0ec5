"""The portal's pure parts: menus from the lifecycle, figures, sessions, redirects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.lifecycle import ItemState, allowed
from siterecovery.portal import views
from siterecovery.portal.auth import safe_next
from siterecovery.portal.session import Sessions

CONDITIONAL = {"cleanup-test", "complete"}  # offered only with a drill / a waiting job


def item_doc(state: ItemState, **extra: object) -> dict[str, object]:
    """An item as ``services.protection.item_view`` shows it (allowed ops from the lifecycle)."""
    ops = [op for op in allowed(state) if op != "replicate"]
    return {"vm": "web01", "state": state.value, "allowed_operations": ops, **extra}


@pytest.mark.parametrize("state", list(ItemState))
def test_a_row_offers_exactly_what_the_lifecycle_allows(state: ItemState) -> None:
    offered = {a.operation for a in views.item_actions(item_doc(state))}
    assert offered <= set(allowed(state))
    assert offered == set(allowed(state)) - {"replicate"} - CONDITIONAL


def test_menus_of_the_failback_story() -> None:
    labels = [a.label for a in views.item_actions(item_doc(ItemState.FAILED_OVER))]
    assert labels == ["Failover", "Commit"]
    committed = views.item_actions(item_doc(ItemState.COMMITTED))
    assert [a.label for a in committed] == [
        "Planned failover",
        "Reverse replicate",
        "Disable replication",
    ]
    planned = committed[0]
    assert (planned.href, planned.post) == ("/items/web01/failover?type=planned", False)
    assert committed[1].href == "/items/web01/reprotect" and committed[1].post
    waiting = views.item_actions(item_doc(ItemState.AWAITING_COMPLETION, busy_job="j1"))
    assert [(a.label, a.href) for a in waiting] == [("Complete failover", "/jobs/j1")]
    drill = views.item_actions(item_doc(ItemState.PROTECTED, drill={"site": "cloud"}))
    assert "Clean up test failover" in [a.label for a in drill]
    assert views.item_actions(item_doc(ItemState.SYNCING)) == []


def test_a_plan_offers_what_every_protected_vm_allows() -> None:
    protected = item_doc(ItemState.PROTECTED, direction="onprem -> cloud")
    offered = views.plan_operations("tiers", [protected, protected])
    assert [o.label for o in offered] == ["Test failover", "Planned failover", "Failover"]
    assert offered[0].href == "/plans/tiers/operations/test-failover"
    assert [(o.points, o.sync, o.failover_type) for o in offered] == [
        (True, False, "test"), (False, False, "planned"), (True, False, "unplanned"),
    ]  # fmt: skip
    # Together only: a failed-over VM beside a protected one leaves just the failover.
    mixed = [protected, item_doc(ItemState.FAILED_OVER)]
    assert [o.label for o in views.plan_operations("tiers", mixed)] == ["Failover"]
    drilled = [protected, item_doc(ItemState.PROTECTED, drill={"vm": "web01-test"})]
    assert "Clean up test failover" in [o.label for o in views.plan_operations("t", drilled)]
    committed = views.plan_operations("t", [item_doc(ItemState.COMMITTED)])
    assert [(o.label, o.sync) for o in committed] == [
        ("Failback", True),
        ("Reverse replicate", False),
    ]
    assert views.plan_operations("t", []) == []


def test_a_plan_operation_outside_the_menu_is_invalid_input() -> None:
    with pytest.raises(InvalidInput) as refused:
        views.plan_operation("tiers", "disable", [])
    assert "test-failover" in refused.value.message


def test_a_plan_jobs_children_in_boot_order() -> None:
    job = {
        "params": {"plan": "tiers", "groups": [
            {"group": 1, "vms": [{"vm": "web01", "kind": "test-failover", "job": "j1"}]},
            {"group": 2, "vms": [{"vm": "db01", "kind": "test-failover", "job": "j2"}]},
        ]},
        "result": {"children": {"db01": "j2", "web01": "j1"}},
    }  # fmt: skip
    assert [(c["group"], c["vm"], c["job"]) for c in views.child_jobs(job)] == [
        (1, "web01", "j1"), (2, "db01", "j2"),
    ]  # fmt: skip
    assert views.child_jobs({"params": {}, "result": {}}) == []
    assert views.plan_jobs([job, {"params": {"vm": "web01"}}], "tiers") == [job]


def test_dialog_direction() -> None:
    item = {"active_site": "cloud", "standby_site": "onprem"}
    assert views.dialog_direction(item, "failback", "onprem") == ("cloud", "onprem")
    # A failed-over item failing over again (another point) stays where it went.
    assert views.dialog_direction(item, "unplanned-failover", "cloud") == ("onprem", "cloud")


def test_timeline_places_points_between_the_oldest_and_now() -> None:
    start = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    points = [
        {"id": f"p{i}", "time": (start + timedelta(minutes=m)).isoformat()}
        for i, m in enumerate((0, 30, 60))
    ]
    placed = views.timeline(points, now=start + timedelta(minutes=120))
    assert [p["left"] for p in placed] == [0.0, 25.0, 50.0]
    assert views.timeline([]) == []


def test_figures() -> None:
    items = [
        {"health": "healthy", "rpo_seconds": 3.0},
        {"health": "critical", "rpo_seconds": 900.0},
        {"health": "none", "rpo_seconds": None},
    ]
    assert views.health_counts(items) == {"healthy": 1, "warning": 0, "critical": 1, "none": 1}
    assert views.worst_rpo(items) == 900.0 and views.worst_rpo([]) is None
    jobs = [{"state": "running"}, {"state": "succeeded"}, {"state": "awaiting-completion"}]
    assert [j["state"] for j in views.running_jobs(jobs)] == ["running", "awaiting-completion"]
    assert views.human_bytes(3 << 20) == "3.0 MiB" and views.human_seconds(None) == views.NONE
    assert views.percent(50, 200) == 25 and views.percent(1, 0) == 0


def test_brief_flattens_a_step_detail() -> None:
    detail = {"disks": {"d0": {"mode": "checksum", "bytes_written": 2 << 20}}, "seconds": 0.12345}
    assert (
        views.brief(detail)
        == "disks.d0.mode=checksum, disks.d0.bytes_written=2.0 MiB, seconds=0.123"
    )
    assert views.brief({f"k{i}": i for i in range(20)}, pairs=2) == "k0=0, k1=1, …"


def test_sessions_are_signed_with_the_token() -> None:
    sessions = Sessions("token-a")
    session = sessions.new(signed_in=True)
    cookie = sessions.dump(session)
    assert "token-a" not in cookie
    assert sessions.load(cookie) == session
    assert Sessions("token-b").load(cookie) is None  # another vault, or a new token
    assert sessions.load(cookie[:-2] + "xx") is None
    assert sessions.load(None) is None
    other = sessions.new(signed_in=True)
    assert other.sid != session.sid and other.csrf != session.csrf
    assert sessions.token_matches("token-a\n") and not sessions.token_matches("token-")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/items", "/items"),
        ("/items/web01/failover?type=planned", "/items/web01/failover?type=planned"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("", "/"),
        (None, "/"),
    ],
)
def test_after_sign_in_only_local_paths(given: str | None, expected: str) -> None:
    assert safe_next(given) == expected


def test_a_failback_offers_only_the_key_the_replicas_use() -> None:
    keys = [{"name": "k1", "fingerprint": "ab"}, {"name": "k2", "fingerprint": "cd"}]
    assert views.key_choices({"vm": "web01"}, keys) == []  # replicas are not encrypted yet
    assert views.key_choices({"vm": "web01", "key": "k2"}, keys) == [keys[1]]
