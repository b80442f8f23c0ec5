"""Replication groups: common points keep linked records consistent across VMs.

The lab's db01 workload links each record to the web01 record it depends on
(web01's last acknowledged seq when it wrote). Two images are consistent with
each other when no db01 record depends on a web01 record the web01 image lacks.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..conftest import Daemon, vault_snapshot
from ..failover.support import job, protect


def together(daemon: Daemon, **params: Any) -> dict[str, Any]:
    report: dict[str, Any] = daemon.call("GET", "/checks", params=params)
    return report


def dry_run_points(daemon: Daemon, plan: str, point: str) -> dict[str, str]:
    body = {"type": "unplanned", "point": point, "dry_run": True}
    doc = daemon.call("POST", f"/plans/{plan}/failover", json=body)
    assert doc["ok"], doc
    return {vm["vm"]: vm["plan"]["point"]["id"] for g in doc["order"] for vm in g["vms"]}


def test_common_point_keeps_linked_records_consistent_and_latest_can_break_them(
    daemon: Daemon, vault: Path
) -> None:
    protect(daemon, "web01")
    protect(daemon, "db01")
    group = daemon.call(
        "POST", "/groups", json={"name": "app", "vms": ["web01", "db01"], "common_interval": 0}
    )
    assert group["members"] == ["web01", "db01"] and group["limit"] == 16

    common = daemon.call("POST", "/groups/app/point")
    assert common["type"] == "app-consistent"
    web_common, db_common = common["points"]["web01"], common["points"]["db01"]
    points = {vm: daemon.call("GET", f"/items/{vm}/points") for vm in ("web01", "db01")}
    assert {p["id"]: p["common"] for p in points["web01"]}[web_common] == common["common"]
    assert {p["id"]: p["common"] for p in points["db01"]}[db_common] == common["common"]
    assert points["web01"][-1]["time"] == points["db01"][-1]["time"]  # one instant

    # db01 alone, a moment later: its newest records depend on web01 records
    # written after web01's newest point.
    time.sleep(1.5)
    daemon.call("POST", "/items/db01/replicate", json={"app_consistent": False})
    db_latest = daemon.call("GET", "/items/db01/points")[-1]
    assert db_latest["common"] is None

    daemon.call("POST", "/plans", json={"name": "app-plan"})
    daemon.call("POST", "/plans/app-plan/vms", json={"group": 1, "vms": ["web01"]})
    daemon.call("POST", "/plans/app-plan/vms", json={"group": 2, "vms": ["db01"]})

    # The seed's point rules, by point id.
    assert dry_run_points(daemon, "app-plan", "latest") == {
        "web01": web_common,  # web01's own newest point is the common one
        "db01": db_latest["id"],  # db01's newest independent point
    }
    assert dry_run_points(daemon, "app-plan", "latest-app-consistent") == {
        "web01": web_common,
        "db01": db_common,
    }

    # Independent latest points CAN be inconsistent with each other...
    broken = together(daemon, vm=["web01", "db01"], point=[web_common, db_latest["id"]])
    assert broken["vms"]["web01"]["consistent"] and broken["vms"]["db01"]["consistent"]
    assert not broken["links"]["consistent"] and not broken["consistent"]
    assert "db01 record" in broken["links"]["errors"][0]
    # ... the common point never is.
    sound = together(daemon, vm=["web01", "db01"], point=[web_common, db_common])
    assert sound["consistent"], sound

    # A member never fails over alone.
    before = vault_snapshot(daemon, vault)
    status, error = daemon.error(
        "POST", "/items/web01/failover", json={"type": "unplanned", "point": "latest"}
    )
    assert (status, error["code"]) == (409, "GROUP_MEMBER_ALONE") and "app" in error["message"]
    daemon.call("POST", "/plans", json={"name": "web-only"})
    daemon.call("POST", "/plans/web-only/vms", json={"group": 1, "vms": ["web01"]})
    before = vault_snapshot(daemon, vault)
    status, error = daemon.error(
        "POST", "/plans/web-only/failover", json={"type": "unplanned", "point": "latest"}
    )
    assert (status, error["code"]) == (409, "GROUP_MEMBER_ALONE")
    assert vault_snapshot(daemon, vault) == before

    # The whole group, by plan, to its latest common app-consistent point.
    answer = daemon.call(
        "POST",
        "/plans/app-plan/failover",
        json={"type": "unplanned", "point": "latest-app-consistent"},
    )
    parent = job(daemon, answer)
    children = parent["result"]["children"]
    for vm, point in (("web01", web_common), ("db01", db_common)):
        child = daemon.call("GET", f"/jobs/{children[vm]}")
        assert child["state"] == "succeeded" and child["params"]["point"] == point
        assert daemon.call("GET", f"/items/{vm}")["state"] == "failed-over"
    live = together(daemon, vm=["web01", "db01"], site="cloud")
    assert live["consistent"], live
    assert live["vms"]["db01"]["links"], "db01's records link to web01's"
