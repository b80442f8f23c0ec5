"""The CLI against a real daemon: the contract's verbs, JSON documents and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..conftest import Daemon


def sr(vault: Path, *args: str, check: bool = True) -> tuple[int, Any]:
    """Run ``siterecovery --json ARGS``; stdout must be exactly one JSON document."""
    run = subprocess.run(
        [sys.executable, "-m", "siterecovery", "--vault", str(vault), "--json", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    document = json.loads(run.stdout)
    if check:
        assert run.returncode == 0, (run.returncode, run.stdout, run.stderr)
    return run.returncode, document


def test_protect_and_inspect_through_the_cli(daemon: Daemon, vault: Path) -> None:
    _, vms = sr(vault, "vm", "list")
    assert {(v["name"], v["power"]) for v in vms} == {("web01", "running"), ("db01", "running")}

    _, job = sr(vault, "protect", "web01", "--to", "cloud", "--interval", "1h", "--wait")
    assert job["state"] == "succeeded" and job["kind"] == "protect"
    assert [s["name"] for s in job["steps"]] == ["prepare", "initial-sync", "enable-replication"]
    assert job["bytes_transferred"] == job["bytes_total"] > 0

    _, report = sr(vault, "replicate", "web01", "--app-consistent")
    assert report["point"]["type"] == "app-consistent"

    _, item = sr(vault, "item", "show", "web01")
    assert item["state"] == "protected" and item["direction"] == "onprem -> cloud"
    assert item["latest_point"]["id"] == report["point"]["id"]

    _, points = sr(vault, "points", "web01")
    assert [p["type"] for p in points] == ["crash-consistent", "app-consistent"]
    _, check = sr(vault, "vm", "check", "web01", "--point", points[-1]["id"])
    assert check["consistent"] and check["last_seq"] == points[-1]["workload_seq"]

    _, shown = sr(vault, "job", "show", job["id"])
    assert shown["state"] == "succeeded" and shown["id"] == job["id"]
    _, jobs = sr(vault, "jobs")
    assert [j["id"] for j in jobs] == [job["id"]]
    _, items = sr(vault, "items")
    assert [i["vm"] for i in items] == ["web01"]


def test_cancel_during_initial_sync_then_protect_again(daemon: Daemon, vault: Path) -> None:
    _, started = sr(vault, "protect", "db01", "--to", "cloud", "--max-rate", "256K")
    job_id = started["job"]
    _, cancelling = sr(vault, "job", "cancel", job_id)
    assert cancelling["id"] == job_id
    _, job = sr(vault, "job", "wait", job_id, check=False)
    assert job["state"] == "cancelled"
    assert job["error"]["code"] in ("JOB_CANCELLED", "SYNC_CANCELLED")
    _, item = sr(vault, "item", "show", "db01")
    assert item["state"] == "disabled" and item["points"] == 0

    code, refused = sr(vault, "job", "cancel", job_id, check=False)
    assert (code, refused["error"]["code"]) == (3, "JOB_FINISHED")

    _, again = sr(vault, "protect", "db01", "--to", "cloud", "--interval", "1h", "--wait")
    assert again["state"] == "succeeded"
    _, item = sr(vault, "item", "show", "db01")
    assert item["state"] == "protected" and item["points"] == 1


def test_disable_removes_the_replica(daemon: Daemon, vault: Path) -> None:
    sr(vault, "protect", "web01", "--to", "cloud", "--interval", "1h", "--wait")
    chain = vault / "sites" / "cloud" / "replicas" / "web01" / "d0"
    assert any(chain.glob("p*.qcow2"))
    _, plan = sr(vault, "disable", "web01", "--dry-run")  # what it deletes; nothing changes
    (point,) = sr(vault, "points", "web01")[1]
    assert plan["ok"] and plan["will_delete"] == [
        f"recovery point {point['id']} ({point['type']}) at cloud"
    ], plan
    # On a terminal it asks first; "no" changes nothing.
    answered = _on_a_terminal(vault, ["disable", "web01"], answer=b"n\n")
    assert answered.returncode == 1 and b"nothing changed" in answered.stdout, answered
    assert point["id"] in answered.stdout.decode(), answered.stdout
    assert sr(vault, "item", "show", "web01")[1]["state"] == "protected"
    assert any(chain.glob("p*.qcow2"))
    _, item = sr(vault, "disable", "web01")  # not a terminal: no question
    assert item["state"] == "disabled" and item["points"] == 0
    assert not chain.exists()
    code, refused = sr(vault, "replicate", "web01", check=False)
    assert (code, refused["error"]["code"]) == (3, "OPERATION_NOT_ALLOWED")
    code, refused = sr(vault, "disable", "web01", check=False)
    assert (code, refused["error"]["code"]) == (3, "OPERATION_NOT_ALLOWED")


def _on_a_terminal(
    vault: Path, args: list[str], *, answer: bytes
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with a pseudo-terminal as its standard input, ``answer`` typed in."""
    import os
    import pty

    primary, secondary = pty.openpty()
    try:
        os.write(primary, answer)
        return subprocess.run(
            [sys.executable, "-m", "siterecovery", "--vault", str(vault), *args],
            stdin=secondary, capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        os.close(secondary)
        os.close(primary)


def test_job_wait_shows_a_progress_bar_without_json(daemon: Daemon, vault: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "siterecovery", "--vault", str(vault), "protect", "web01",
         "--to", "cloud", "--interval", "1h", "--wait"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "120"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "succeeded" in run.stdout
    assert "MiB" in run.stdout  # bytes done/total of the bar's final frame


def test_inventory_and_policy_through_the_cli(daemon: Daemon, vault: Path, tmp_path: Path) -> None:
    _, lab = sr(vault, "lab", "up")  # idempotent: nothing new, VMs still running
    assert sorted(v["name"] for v in lab["vms"]) == ["db01", "web01"]
    _, site = sr(vault, "site", "add", "dr2", "--path", str(tmp_path / "dr2"), "--role", "cloud")
    assert site["role"] == "cloud" and (tmp_path / "dr2" / "site.json").exists()
    _, host = sr(vault, "host", "add", "dr2", "dr2-host", "--switch", "vswitch-prod")
    assert host["switches"] == ["vswitch-prod"]
    _, vm = sr(vault, "vm", "create", "file01", "--host", "hv01", "--disk", "128M",
               "--disk", "64M", "--os", "windows", "--no-workload")  # fmt: skip
    assert [d["size"] for d in vm["disks"]] == [128 << 20, 64 << 20] and vm["os"] == "windows"
    _, stopped = sr(vault, "vm", "stop", "file01")
    assert stopped["power"] == "stopped"
    _, running = sr(vault, "vm", "start", "file01")
    assert running["power"] == "running"
    _, shown = sr(vault, "vm", "show", "web01", "--site", "onprem")
    assert shown["guest"]["seq"] > 0
    _, check = sr(vault, "vm", "check", "web01")
    assert check["consistent"] and check["site"] == "onprem"

    sr(vault, "protect", "file01", "--to", "dr2", "--interval", "1h", "--wait")
    _, item = sr(vault, "item", "set", "file01", "--interval", "2m", "--retention", "2h")
    assert (item["policy"]["interval"], item["policy"]["retention"]) == (120.0, 7200.0)
    code, refused = sr(vault, "item", "set", "file01", "--interval", "-1s", check=False)
    assert (code, refused["error"]["code"]) == (2, "INVALID_INPUT")
    _, item = sr(vault, "item", "show", "file01")
    assert item["policy"]["interval"] == 120.0 and item["standby_site"] == "dr2"
    assert (tmp_path / "dr2" / "replicas" / "file01" / "d1" / "p000001.qcow2").exists()


def test_failover_verbs_through_the_cli(daemon: Daemon, vault: Path) -> None:
    from siterecovery.domain.model import Site, SiteRole
    from siterecovery.providers.local.guest import WorkloadControl
    from siterecovery.providers.local.provider import LocalProvider

    sr(vault, "protect", "web01", "--to", "cloud", "--interval", "1h", "--wait")
    # A dry run that would be refused prints its whole plan and exits as the refusal would.
    code, plan = sr(vault, "commit", "web01", "--dry-run", check=False)
    assert code == 3 and plan["dry_run"] and plan["ok"] is False, (code, plan)
    assert plan["failed_preconditions"] and plan["preconditions"], plan
    onprem = Site("onprem", "local", str(vault / "sites" / "onprem"), SiteRole.ON_PREMISES)
    guest = WorkloadControl(LocalProvider().run_dir(onprem, "vm-web01") / "workload.sock")
    guest.quiesce(timeout=120)
    try:
        sr(vault, "replicate", "web01")
        _, same = sr(vault, "verify", "web01")
    finally:
        guest.thaw()
    assert same["equal"] and same["other"].startswith("point ")
    time.sleep(0.5)
    code, differs = sr(vault, "verify", "web01", check=False)
    assert code == 1 and not differs["equal"]
    assert differs["disks"]["d0"]["differing_blocks"] > 0 and differs["disks"]["d0"]["ranges"]

    _, plan = sr(vault, "failover", "web01", "--type", "unplanned", "--dry-run")
    assert plan["dry_run"] and plan["ok"] and plan["bytes_to_move"] == 0
    assert plan["point"]["id"] and plan["will_create"] == ["VM web01 at cloud"]
    assert [i["state"] for i in sr(vault, "items")[1]] == ["protected"]  # nothing changed
    _, done = sr(vault, "failover", "web01", "--type", "unplanned", "--wait")
    assert done["state"] == "succeeded"
    _, plan = sr(vault, "commit", "web01", "--dry-run")
    assert plan["ok"] and plan["will_delete"] == []
    sr(vault, "commit", "web01", "--wait")
    code, refused = sr(vault, "complete", "web01", check=False)  # nothing waits yet
    assert (code, refused["error"]["code"]) == (3, "OPERATION_NOT_ALLOWED"), refused
    assert "no failback awaiting completion" in refused["error"]["message"]
    code, refused = sr(vault, "complete", "nosuch", check=False)
    assert refused["error"]["code"] == "JOB_NOT_FOUND", refused
    _, waiting = sr(vault, "failover", "web01", "--type", "planned", "--sync", "delta", "--wait")
    assert waiting["state"] == "awaiting-completion"
    _, item = sr(vault, "item", "show", "web01")
    assert "complete" in item["allowed_operations"]
    _, done = sr(vault, "complete", "web01", "--wait")  # the VM's name: its waiting job
    assert done["state"] == "succeeded" and done["result"]["integrity"]["equal"]
    assert set(done["result"]["phase2"]) >= {
        "predicted_bytes", "predicted_seconds", "bytes", "downtime_seconds"
    }  # fmt: skip
    _, plan = sr(vault, "commit", "web01", "--dry-run")
    assert plan["will_delete"] == ["VM web01 and its disks at cloud"]
    sr(vault, "commit", "web01", "--wait")
    _, plan = sr(vault, "reprotect", "web01", "--dry-run")
    assert plan["ok"] and plan["direction"] == "onprem -> cloud"
    _, done = sr(vault, "reprotect", "web01", "--wait")
    assert done["state"] == "succeeded"
    _, drill = sr(vault, "failover", "web01", "--type", "test", "--wait")
    assert drill["result"]["drill"]["vm"] == "web01-test"
    _, cleaned = sr(vault, "cleanup-test", "web01", "--wait")
    assert cleaned["state"] == "succeeded"


def test_demo_tells_the_hyperv_story(daemon: Daemon, vault: Path) -> None:
    _, report = sr(vault, "demo", "--vm", "db01", "--seconds", "1")
    assert [s["step"] for s in report["steps"]][-3:] == [
        "complete failover (phase 2)", "commit", "reverse replicate"
    ]  # fmt: skip
    assert report["integrity"]["equal"] is True
    assert report["phase2"]["downtime_seconds"] > 0
    assert (report["state"], report["direction"]) == ("protected", "onprem -> cloud")
