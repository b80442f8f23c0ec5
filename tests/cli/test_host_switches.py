"""``host set H --switch NAME / --remove-switch NAME``: the way out of the
switch rule. A failover to a host without the VM's switch is refused with
the command that fixes it; running that command lets the failover through;
a switch a VM still uses cannot be removed; bad input changes nothing."""

from __future__ import annotations

from pathlib import Path

from ..conftest import Daemon
from .test_cli_e2e import sr


def _switches(vault: Path, host: str) -> list[str]:
    _, hosts = sr(vault, "host", "list")
    found: list[str] = next(h["switches"] for h in hosts if h["name"] == host)
    return found


def test_a_missing_switch_is_added_with_the_command_the_refusal_names(
    daemon: Daemon, vault: Path
) -> None:
    _, host = sr(vault, "host", "set", "hv01", "--switch", "vswitch-dmz")
    assert host["switches"] == ["vswitch-prod", "vswitch-dmz"]
    daemon.call("POST", "/vms", json={"name": "app02", "host": "hv01", "disks": ["64M"],
                                      "switch": "vswitch-dmz", "workload": False})  # fmt: skip
    sr(vault, "protect", "app02", "--to", "cloud", "--interval", "1h", "--wait")

    status, error = daemon.error("POST", "/items/app02/failover", json={"type": "unplanned"})
    assert (status, error["code"]) == (409, "SWITCH_MISSING"), error
    assert "siterecovery host set cloud-host --switch vswitch-dmz" in error["message"], error
    assert daemon.call("GET", "/items/app02")["state"] == "protected"  # nothing happened

    sr(vault, "host", "set", "cloud-host", "--switch", "vswitch-dmz")
    _, plan = sr(vault, "failover", "app02", "--type", "unplanned", "--dry-run")
    assert plan["ok"], plan


def test_a_switch_in_use_or_unknown_is_not_removed(daemon: Daemon, vault: Path) -> None:
    before = _switches(vault, "hv01")
    code, refused = sr(vault, "host", "set", "hv01", "--remove-switch", "vswitch-prod",
                       check=False)  # fmt: skip
    assert (code, refused["error"]["code"]) == (3, "VM_BUSY"), refused
    assert "vswitch-prod" in refused["error"]["message"]
    code, refused = sr(vault, "host", "set", "hv01", "--remove-switch", "nosuch", check=False)
    assert (code, refused["error"]["code"]) == (2, "INVALID_INPUT"), refused
    assert "its switches: vswitch-prod" in refused["error"]["message"]
    code, refused = sr(vault, "host", "set", "hv01", check=False)
    assert (code, refused["error"]["code"]) == (2, "INVALID_INPUT"), refused
    code, refused = sr(vault, "host", "set", "hv01", "--switch", "x", "--remove-switch", "x",
                       check=False)  # fmt: skip
    assert (code, refused["error"]["code"]) == (2, "INVALID_INPUT"), refused
    assert _switches(vault, "hv01") == before

    sr(vault, "host", "set", "hv01", "--switch", "vswitch-lab")
    _, host = sr(vault, "host", "set", "hv01", "--remove-switch", "vswitch-lab", "--disconnected")
    assert host["switches"] == before and host["connected"] is False
    _, host = sr(vault, "host", "set", "hv01", "--connected")
    assert host["switches"] == before and host["connected"] is True
