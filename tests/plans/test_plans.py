"""Recovery plans: boot order, actions, the seed's rules, and a plan failback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..conftest import Daemon, vault_snapshot
from ..failover.support import job, protect


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def steps(daemon: Daemon, job_id: str) -> dict[str, dict[str, Any]]:
    found = daemon.call("GET", f"/jobs/{job_id}")
    return {s["name"]: s for s in found["steps"]}


def make_plan(daemon: Daemon, name: str, *groups: list[str]) -> None:
    daemon.call("POST", "/plans", json={"name": name})
    for index, vms in enumerate(groups, start=1):
        daemon.call("POST", f"/plans/{name}/vms", json={"group": index, "vms": vms})


def cli(vault: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "siterecovery", "--vault", str(vault), "--json", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_boot_groups_start_in_order_after_scripts_and_manual_actions(
    daemon: Daemon, vault: Path, tmp_path: Path
) -> None:
    protect(daemon, "web01")
    protect(daemon, "db01")
    make_plan(daemon, "tiers", ["web01"], ["db01"])
    marker = tmp_path / "pre-group-2.txt"
    daemon.call(
        "POST",
        "/plans/tiers/actions",
        json={
            "group": 2, "name": "warm-cache", "kind": "script", "when": "before",
            "command": f"echo \"vms=$SR_VMS group=$SR_GROUP\" | tee {marker}", "timeout": 30,
        },
    )  # fmt: skip
    daemon.call(
        "POST",
        "/plans/tiers/actions",
        json={
            "group": 2, "name": "check-dns", "kind": "manual", "when": "before",
            "instructions": "point db.example at the recovery site",
        },
    )  # fmt: skip

    answer = daemon.call("POST", "/plans/tiers/failover", json={"type": "test"})
    paused = job(daemon, answer, state="awaiting-action")
    assert paused["allowed_actions"] == ["cancel", "resume"]
    assert paused["result"]["waiting_for"]["action"] == "check-dns"
    children = paused["result"]["children"]
    # Paused before group 2: db01's job does not exist yet, the script ran.
    status, error = daemon.error("GET", f"/jobs/{children['db01']}")
    assert (status, error["code"]) == (404, "JOB_NOT_FOUND")
    assert marker.read_text().strip() == "vms=db01 group=2"

    resumed = cli(vault, "job", "resume", answer["job"])
    assert resumed.returncode == 0, resumed.stderr
    done = job(daemon, answer)
    assert done["state"] == "succeeded"

    plan_steps = steps(daemon, answer["job"])
    web = steps(daemon, children["web01"])
    db = steps(daemon, children["db01"])
    script = plan_steps["group-2 before warm-cache"]
    manual = plan_steps["group-2 before check-dns"]
    assert "vms=db01" in script["detail"]["output"] and script["detail"]["exit_code"] == 0
    # Group 2 starts only after group 1's VM runs and after its actions.
    assert at(web["start-test-vm"]["finished"]) <= at(script["started"])
    assert at(script["finished"]) <= at(manual["started"])
    assert at(manual["finished"]) <= at(db["create-test-vm"]["started"])
    for vm in ("web01", "db01"):
        vms = daemon.call("GET", "/vms", params={"site": "cloud"})
        assert f"{vm}-test" in {v["name"] for v in vms}

    cleanup = job(daemon, daemon.call("POST", "/plans/tiers/cleanup-test"))
    assert cleanup["state"] == "succeeded"
    vms = daemon.call("GET", "/vms", params={"site": "cloud"})
    assert not {v["name"] for v in vms} & {"web01-test", "db01-test"}

    # A failing script stops the plan: the next group never starts, its VM is free.
    make_plan(daemon, "broken", ["web01"], ["db01"])
    daemon.call(
        "POST",
        "/plans/broken/actions",
        json={
            "group": 2, "name": "fails", "kind": "script", "when": "before",
            "command": "echo 'no route to db' >&2; exit 3",
        },
    )  # fmt: skip
    failed = job(daemon, daemon.call("POST", "/plans/broken/failover", json={"type": "test"}),
                 state="failed")  # fmt: skip
    assert failed["error"]["code"] == "ACTION_FAILED"
    assert "exit status 3" in failed["error"]["message"]
    assert "no route to db" in failed["error"]["message"]
    assert daemon.call("GET", "/items/db01")["busy_job"] is None
    assert daemon.call("GET", "/items/db01")["drill"] is None
    assert daemon.call("GET", "/items/web01")["drill"] is not None  # group 1 ran


def test_the_seeds_plan_rules_refuse_and_change_nothing(daemon: Daemon, vault: Path) -> None:
    protect(daemon, "web01")  # db01 is never protected: it has no point
    make_plan(daemon, "both", ["web01"], ["db01"])

    def refused(path: str, body: dict[str, Any], status: int, code: str) -> str:
        before = vault_snapshot(daemon, vault)
        got_status, error = daemon.error("POST", path, json=body)
        assert (got_status, error["code"]) == (status, code), error
        assert vault_snapshot(daemon, vault) == before
        message: str = error["message"]
        return message

    message = refused("/plans/both/failover", {"type": "unplanned"}, 409, "PLAN_VMS_WITHOUT_POINTS")
    assert "db01" in message and "web01" not in message
    refused("/plans/both/failover", {"type": "planned"}, 409, "PLAN_VMS_WITHOUT_POINTS")
    refused("/plans/both/failover", {"type": "unplanned", "point": "web01-000001"}, 400,
            "INVALID_INPUT")  # fmt: skip
    daemon.call("POST", "/plans", json={"name": "empty"})
    refused("/plans/empty/failover", {"type": "test"}, 409, "PLAN_EMPTY")
    refused("/plans/nope/failover", {"type": "test"}, 404, "PLAN_NOT_FOUND")
    refused("/plans/both/vms", {"group": 4, "vms": ["web01"]}, 400, "INVALID_INPUT")
    refused("/plans/both/vms", {"group": 1, "vms": ["db01"]}, 400, "INVALID_INPUT")
    refused("/plans/both/vms", {"group": 1, "vms": ["ghost"]}, 404, "VM_NOT_FOUND")
    refused(
        "/plans/both/actions", {"group": 1, "name": "x", "kind": "script"}, 400, "INVALID_INPUT"
    )
    # Groups: only protected VMs, one group per VM, the same two sites.
    refused("/groups", {"name": "g", "vms": ["web01", "db01"]}, 404, "ITEM_NOT_FOUND")
    daemon.call("POST", "/groups", json={"name": "g1", "vms": ["web01"]})
    refused("/groups", {"name": "g2", "vms": ["web01"]}, 409, "ALREADY_IN_GROUP")
    refused("/groups", {"name": "g3", "vms": [], "common_interval": 0}, 400, "INVALID_INPUT")

    # The dry run names the VM without a point and the order.
    dry = daemon.call("POST", "/plans/both/failover", json={"type": "test", "dry_run": True})
    assert not dry["ok"]
    assert [c["code"] for c in dry["checks"] if not c["ok"]] == ["PLAN_VMS_WITHOUT_POINTS"]
    assert [[v["vm"] for v in g["vms"]] for g in dry["order"]] == [["web01"], ["db01"]]
    run = cli(vault, "plan", "failover", "both", "--type", "unplanned")
    assert run.returncode == 3 and "PLAN_VMS_WITHOUT_POINTS" in run.stdout


def test_plan_failback_with_delta_sync_brings_every_vm_home_in_order(
    daemon: Daemon, vault: Path
) -> None:
    protect(daemon, "web01")
    protect(daemon, "db01")
    make_plan(daemon, "app", ["web01"], ["db01"])
    job(daemon, daemon.call("POST", "/plans/app/failover", json={"type": "unplanned"}))
    job(daemon, daemon.call("POST", "/plans/app/commit"))
    for vm in ("web01", "db01"):
        found = daemon.call("GET", f"/items/{vm}")
        assert (found["state"], found["active_site"]) == ("committed", "cloud")

    dry = daemon.call(
        "POST", "/plans/app/failover", json={"type": "planned", "sync": "delta", "dry_run": True}
    )
    assert dry["ok"] and dry["operation"] == "failback"
    assert [v["kind"] for g in dry["order"] for v in g["vms"]] == ["failback", "failback"]
    assert all(v["plan"]["bytes_to_move"] > 0 for g in dry["order"] for v in g["vms"])

    answer = daemon.call("POST", "/plans/app/failover", json={"type": "planned", "sync": "delta"})
    assert answer["kind"] == "plan-failback"
    waiting = job(daemon, answer, state="awaiting-completion")
    children = waiting["result"]["children"]
    for vm in ("web01", "db01"):
        assert daemon.call("GET", f"/jobs/{children[vm]}")["state"] == "awaiting-completion"
    assert waiting["bytes_done"] > 0  # the sum of the children's phase 1

    daemon.call("POST", f"/jobs/{answer['job']}/complete")
    job(daemon, answer)
    web, db = (daemon.call("GET", f"/jobs/{children[vm]}") for vm in ("web01", "db01"))
    for child in (web, db):
        assert child["state"] == "succeeded"
        assert child["integrity"]["equal"] is True
        assert child["integrity"]["source_digest"] == child["integrity"]["target_digest"]
    web_steps = {s["name"]: s for s in web["steps"]}
    db_steps = {s["name"]: s for s in db["steps"]}
    # Home in the plan's order: db01 stops only once web01 runs again at home.
    assert at(web_steps["start-target"]["finished"]) <= at(db_steps["stop-source"]["started"])
    for vm in ("web01", "db01"):
        found = daemon.call("GET", f"/items/{vm}")
        assert (found["state"], found["active_site"]) == ("failed-over", "onprem")

    job(daemon, daemon.call("POST", "/plans/app/commit"))
    job(daemon, daemon.call("POST", "/plans/app/reprotect"))
    for vm in ("web01", "db01"):
        found = daemon.call("GET", f"/items/{vm}")
        assert (found["state"], found["direction"]) == ("protected", "onprem -> cloud")
        assert daemon.call("GET", f"/vms/{vm}/check", params={"site": "onprem"})["consistent"]


def test_group_and_plan_commands_of_the_cli(daemon: Daemon, vault: Path) -> None:
    """The README's multi-VM session, human output and --json, up to the dry run."""

    def human(*args: str) -> str:
        run = subprocess.run(
            [sys.executable, "-m", "siterecovery", "--vault", str(vault), *args],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    protect(daemon, "web01")
    protect(daemon, "db01")
    assert "web01, db01" in human("group", "create", "app", "--vms", "web01,db01", "--every", "0")
    point = json.loads(cli(vault, "group", "point", "app").stdout)
    assert set(point["points"]) == {"web01", "db01"}
    assert "app-c000001" in human("group", "list")
    assert "db01" not in human("group", "remove", "app", "db01").split("Replication groups")[1]
    assert "web01, db01" in human("group", "add", "app", "db01")
    human("plan", "create", "app", "--description", "web and db tiers")
    human("plan", "add", "app", "--group", "1", "web01")
    human("plan", "add", "app", "--group", "2", "db01")
    shown = human("plan", "action", "app", "warm-up", "--group", "2", "--script", "true")
    assert "warm-up" in shown and "db01" in shown
    dry = human(
        "plan", "failover", "app", "--type", "unplanned", "--point", "latest-app-consistent",
        "--dry-run",
    )  # fmt: skip
    assert point["points"]["web01"] in dry and point["points"]["db01"] in dry
    assert "would run" in dry
    checked = human("vm", "check", "web01", "db01", "--point", point["points"]["web01"],
                    "--point", point["points"]["db01"])  # fmt: skip
    assert "links: every record depends only on records the other VMs hold" in checked
    listed = json.loads(cli(vault, "plan", "list").stdout)
    assert [p["name"] for p in listed] == ["app"] and listed[0]["vms"] == ["web01", "db01"]


def test_a_paused_plan_survives_a_daemon_crash_and_a_cancel_releases_its_vms(
    daemon: Daemon, vault: Path
) -> None:
    protect(daemon, "web01")
    protect(daemon, "db01")
    make_plan(daemon, "tiers", ["web01"], ["db01"])
    daemon.call(
        "POST", "/plans/tiers/actions",
        json={"group": 2, "name": "approve", "kind": "manual", "instructions": "ok?"},
    )  # fmt: skip
    answer = daemon.call("POST", "/plans/tiers/failover", json={"type": "test"})
    job(daemon, answer, state="awaiting-action")
    daemon.kill()
    daemon.start()
    resumed = daemon.call("GET", f"/jobs/{answer['job']}")
    assert resumed["state"] == "awaiting-action"
    daemon.call("POST", f"/jobs/{answer['job']}/resume")
    assert job(daemon, answer)["state"] == "succeeded"
    status, error = daemon.error("POST", f"/jobs/{answer['job']}/resume")
    assert (status, error["code"]) == (409, "OPERATION_NOT_ALLOWED")
    job(daemon, daemon.call("POST", "/plans/tiers/cleanup-test"))

    # Cancel while paused: the VMs of the groups not started are free again.
    second = daemon.call("POST", "/plans/tiers/failover", json={"type": "test"})
    job(daemon, second, state="awaiting-action")
    children = daemon.call("GET", f"/jobs/{second['job']}")["result"]["children"]
    assert daemon.call("GET", "/items/db01")["busy_job"] == children["db01"]
    daemon.call("POST", f"/jobs/{second['job']}/cancel")
    cancelled = job(daemon, second, state="cancelled")
    assert cancelled["error"]["code"] == "JOB_CANCELLED"
    assert daemon.call("GET", "/items/db01")["busy_job"] is None
    assert daemon.call("GET", "/items/web01")["busy_job"] is None


def test_plan_failback_with_full_download_and_scheduled_common_points(
    daemon: Daemon, vault: Path
) -> None:
    protect(daemon, "web01")
    protect(daemon, "db01")
    # The scheduler takes the group's common points by itself (every 10 s here).
    daemon.call(
        "POST", "/groups", json={"name": "app", "vms": ["web01", "db01"], "common_interval": 10}
    )
    deadline = time.monotonic() + 60
    while daemon.call("GET", "/groups/app")["latest_common"] is None:
        assert time.monotonic() < deadline, "no scheduled common point within 60 s"
        time.sleep(0.5)
    common = daemon.call("GET", "/groups/app")["latest_common"]
    assert common["type"] == "app-consistent" and set(common["points"]) == {"web01", "db01"}

    make_plan(daemon, "app", ["web01"], ["db01"])
    job(daemon, daemon.call("POST", "/plans/app/failover", json={"type": "unplanned"}))
    job(daemon, daemon.call("POST", "/plans/app/commit"))
    answer = daemon.call("POST", "/plans/app/failover", json={"type": "planned", "sync": "full"})
    done = job(daemon, answer)
    children = done["result"]["children"]
    web, db = (daemon.call("GET", f"/jobs/{children[vm]}") for vm in ("web01", "db01"))
    for child in (web, db):
        assert child["integrity"]["equal"] is True
        assert "full-download" in {s["name"] for s in child["steps"]}
    web_steps = {s["name"]: s for s in web["steps"]}
    db_steps = {s["name"]: s for s in db["steps"]}
    assert at(web_steps["start-target"]["finished"]) <= at(db_steps["stop-source"]["started"])
    assert done["bytes_done"] == web["bytes_done"] + db["bytes_done"] > 0
