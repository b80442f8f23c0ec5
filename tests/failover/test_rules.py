"""The seeds' rules: each refusal has its stable code, says what to do, and
changes nothing (the whole vault and the replica files compared before and
after), through the API and the CLI alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..conftest import Daemon, vault_snapshot
from .support import failover, item, job, protect

CLI_EXIT = {"usage": 2, "rule": 3, "not-found": 4}


def refused(daemon: Daemon, vault: Path, path: str, body: dict[str, Any], code: str) -> str:
    """Assert the API and the CLI both refuse with ``code`` and change nothing."""
    before = vault_snapshot(daemon, vault)
    status, error = daemon.error("POST", path, json=body)
    assert (status, error["code"]) == (409, code), error
    assert vault_snapshot(daemon, vault) == before
    message: str = error["message"]
    return message


def cli_refused(vault: Path, args: list[str], code: str, daemon: Daemon) -> None:
    before = vault_snapshot(daemon, vault)
    run = subprocess.run(
        [sys.executable, "-m", "siterecovery", "--vault", str(vault), "--json", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 3, run.stdout + run.stderr
    assert json.loads(run.stdout)["error"]["code"] == code
    assert vault_snapshot(daemon, vault) == before


def test_rules_from_the_seeds(daemon: Daemon, vault: Path) -> None:
    protect(daemon, "web01")
    # No recovery point of the kind asked for.
    message = refused(
        daemon, vault, "/items/web01/failover",
        {"type": "unplanned", "point": "latest-app-consistent"}, "NO_RECOVERY_POINT",
    )  # fmt: skip
    assert "app-consistent" in message
    cli_refused(
        vault, ["failover", "web01", "--type", "unplanned", "--point", "latest-app-consistent"],
        "NO_RECOVERY_POINT", daemon,
    )  # fmt: skip
    # The dry run lists the failed precondition and does nothing.
    plan = daemon.call(
        "POST", "/items/web01/failover",
        json={"type": "unplanned", "point": "latest-app-consistent", "dry_run": True},
    )  # fmt: skip
    assert not plan["ok"] and plan["failed_preconditions"][0]["code"] == "NO_RECOVERY_POINT"

    job(daemon, failover(daemon, "web01", type="unplanned"))
    # Hyper-V path: failback before the failover is committed.
    message = refused(
        daemon, vault, "/items/web01/failover", {"type": "planned"}, "FAILOVER_NOT_COMMITTED"
    )
    assert "siterecovery commit web01" in message
    cli_refused(vault, ["failover", "web01", "--type", "planned"], "FAILOVER_NOT_COMMITTED", daemon)
    job(daemon, daemon.call("POST", "/items/web01/commit", json={}))

    # A key for data that is not encrypted is a mistake, said as such.
    before = vault_snapshot(daemon, vault)
    status, error = daemon.error(
        "POST", "/items/web01/failover", json={"type": "planned", "key": "k1"}
    )
    assert (status, error["code"]) == (400, "INVALID_INPUT") and "not encrypted" in error["message"]
    assert vault_snapshot(daemon, vault) == before

    # Alternate hosts: another hypervisor kind, disconnected, without the switch.
    hosts = [
        {"site": "onprem", "name": "hv-hyperv", "switches": ["vswitch-prod"], "kind": "hyperv"},
        {"site": "onprem", "name": "hv-off", "switches": ["vswitch-prod"], "connected": False},
        {"site": "onprem", "name": "hv-bare", "switches": []},
    ]
    for host in hosts:
        daemon.call("POST", "/hosts", json=host)
    for host, code in (
        ("hv-hyperv", "HYPERVISOR_MISMATCH"),
        ("hv-off", "HOST_DISCONNECTED"),
        ("hv-bare", "SWITCH_MISSING"),
    ):
        body = {"type": "planned", "host": host, "create_vm": True}
        refused(daemon, vault, "/items/web01/failover", body, code)
    daemon.call("PATCH", "/hosts/hv-off", json={"connected": True})
    plan = daemon.call(
        "POST", "/items/web01/failover", json={"type": "planned", "host": "hv-off", "dry_run": True}
    )
    checks = {c["name"]: c for c in plan["preconditions"]}
    assert checks["host connected"]["ok"], plan  # reconnected: that precondition holds now
    # But web01 is on hv01 there: another host is the alternate location (a new VM),
    # never a silent move of the existing one.
    assert [c["code"] for c in plan["failed_preconditions"]] == ["TARGET_VM_ELSEWHERE"], plan
    assert "vm delete web01 --site onprem" in plan["failed_preconditions"][0]["message"]
    plan = daemon.call(
        "POST", "/items/web01/failover",
        json={"type": "planned", "create_vm": True, "dry_run": True},
    )  # fmt: skip
    assert plan["ok"] and plan["will_create"] == [], plan
    assert plan["notes"] and "--create-vm creates nothing" in plan["notes"][0], plan

    # The failed-over VM was deleted: it cannot fail back.
    daemon.call("DELETE", "/vms/web01", params={"site": "cloud"})
    refused(daemon, vault, "/items/web01/failover", {"type": "planned"}, "FAILED_OVER_VM_MISSING")

    # Protection disabled: no failover at all.
    protect(daemon, "db01")
    daemon.call("POST", "/items/db01/disable")
    refused(daemon, vault, "/items/db01/failover", {"type": "unplanned"}, "PROTECTION_DISABLED")


def test_no_failback_from_storage_without_block_access(
    daemon: Daemon, vault: Path, tmp_path: Path
) -> None:
    blob = {"name": "blob", "path": str(tmp_path / "blob"), "role": "cloud", "storage": "managed"}
    daemon.call("POST", "/sites", json=blob)
    host = {"site": "blob", "name": "blob-host", "switches": ["vswitch-prod"]}
    daemon.call("POST", "/hosts", json=host)
    job(daemon, daemon.call("POST", "/items", json={"vm": "db01", "to": "blob", "interval": "1h"}))
    job(daemon, failover(daemon, "db01", type="unplanned"))
    job(daemon, daemon.call("POST", "/items/db01/commit", json={}))
    message = refused(daemon, vault, "/items/db01/failover", {"type": "planned"}, "NO_BLOCK_ACCESS")
    assert "managed" in message


def test_reverse_replication_must_be_healthy_to_fail_back(daemon: Daemon, vault: Path) -> None:
    protect(daemon, "web01")
    job(daemon, failover(daemon, "web01", type="unplanned"))
    job(daemon, daemon.call("POST", "/items/web01/commit", json={}))
    job(daemon, daemon.call("POST", "/items/web01/reprotect", json={}))
    assert item(daemon, "web01")["health"] == "healthy"
    # Break the replica storage at onprem: the next pass fails for real.
    chain = vault / "sites" / "onprem" / "replicas" / "web01" / "d0"
    aside = chain.with_name("d0.aside")
    chain.rename(aside)
    chain.write_text("not a directory\n")
    status, error = daemon.error("POST", "/items/web01/replicate", json={})
    assert (status, error["code"]) == (502, "DISK_ERROR") and "unusable" in error["message"]
    assert item(daemon, "web01")["last_error"]["code"] == "DISK_ERROR"
    message = refused(
        daemon, vault, "/items/web01/failover", {"type": "unplanned"}, "REPLICATION_UNHEALTHY"
    )
    assert "cloud -> onprem" in message
    chain.unlink()
    aside.rename(chain)
    daemon.call("POST", "/items/web01/replicate", json={})
    assert item(daemon, "web01")["health"] == "healthy"
    plan = daemon.call("POST", "/items/web01/failover", json={"type": "unplanned", "dry_run": True})
    assert plan["ok"], plan


def test_protect_again_after_a_failover_and_disable(daemon: Daemon, vault: Path) -> None:
    """After failover, commit and disable the VM runs at cloud and a stopped copy
    lingers at onprem: protecting toward onprem is refused (naming the copy and
    the command that deletes it), then goes through once the copy is gone."""
    protect(daemon, "db01")
    job(daemon, failover(daemon, "db01", type="unplanned", point="latest"))
    job(daemon, daemon.call("POST", "/items/db01/commit", json={}))
    assert daemon.call("POST", "/items/db01/disable")["state"] == "disabled"
    body = {"vm": "db01", "to": "onprem", "interval": "1h"}
    message = refused(daemon, vault, "/items", body, "VM_COPY_AT_TARGET")
    assert "vm delete db01 --site onprem" in message
    daemon.call("DELETE", "/vms/db01", params={"site": "onprem"})
    job(daemon, daemon.call("POST", "/items", json=body))
    shown = item(daemon, "db01")
    assert (shown["state"], shown["active_site"], shown["standby_site"]) == (
        "protected",
        "cloud",
        "onprem",
    )
