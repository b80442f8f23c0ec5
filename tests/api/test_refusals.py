"""Bad input is refused with a stable code and a helpful message, and changes nothing.

Each refusal is tried through the API and through the CLI (exit codes), and the
vault (every listing) and the replica storage are compared before and after.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..conftest import Daemon, vault_snapshot


def _cli(vault: Path, *args: str) -> tuple[int, dict[str, Any]]:
    run = subprocess.run(
        [sys.executable, "-m", "siterecovery", "--vault", str(vault), "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return run.returncode, json.loads(run.stdout)


@pytest.fixture
def protected(daemon: Daemon) -> Daemon:
    body = {"vm": "web01", "to": "cloud", "interval": "1h"}
    job = daemon.wait_job(daemon.call("POST", "/items", json=body)["job"])
    assert job["state"] == "succeeded", job
    return daemon


CASES = [
    # (name, CLI args, API body, HTTP status, code, exit code, words in the message)
    ("unknown VM", ["protect", "nope", "--to", "cloud"], {"vm": "nope", "to": "cloud"},
     404, "VM_NOT_FOUND", 4, ["nope", "vm list"]),
    ("unknown site", ["protect", "db01", "--to", "mars"], {"vm": "db01", "to": "mars"},
     404, "SITE_NOT_FOUND", 4, ["mars", "site list"]),
    ("already protected", ["protect", "web01", "--to", "cloud"], {"vm": "web01", "to": "cloud"},
     409, "ALREADY_PROTECTED", 3, ["already protected", "disable web01"]),
    ("own site", ["protect", "db01", "--to", "onprem"], {"vm": "db01", "to": "onprem"},
     409, "SAME_SITE", 3, ["onprem", "another site"]),
    ("negative interval", ["protect", "db01", "--to", "cloud", "--interval", "-5s"],
     {"vm": "db01", "to": "cloud", "interval": "-5s"}, 400, "INVALID_INPUT", 2, ["interval"]),
    ("zero threads", ["protect", "db01", "--to", "cloud", "--threads", "0"],
     {"vm": "db01", "to": "cloud", "threads": 0}, 400, "INVALID_INPUT", 2, ["threads"]),
    ("retention below interval",
     ["protect", "db01", "--to", "cloud", "--interval", "1h", "--retention", "10m"],
     {"vm": "db01", "to": "cloud", "interval": "1h", "retention": "10m"},
     400, "INVALID_INPUT", 2, ["retention"]),
    ("interval past the default retention",
     ["protect", "db01", "--to", "cloud", "--interval", "2d"],
     {"vm": "db01", "to": "cloud", "interval": "2d"},
     400, "INVALID_INPUT", 2, ["interval: an interval of 2d", "(--retention not given)",
                               "--retention 2d or more"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "body", "status", "code", "exit_code", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_protect_refusals_change_nothing(
    protected: Daemon,
    vault: Path,
    args: list[str],
    body: dict[str, Any],
    status: int,
    code: str,
    exit_code: int,
    words: list[str],
) -> None:
    before = vault_snapshot(protected, vault)
    got_status, error = protected.error("POST", "/items", json=body)
    assert (got_status, error["code"]) == (status, code)
    for word in words:
        assert word in error["message"]
    assert vault_snapshot(protected, vault) == before

    got_exit, document = _cli(vault, *args)
    assert got_exit == exit_code
    assert document["error"]["code"] == code
    assert vault_snapshot(protected, vault) == before


def test_other_refusals(protected: Daemon, vault: Path) -> None:
    before = vault_snapshot(protected, vault)
    unprotected = protected.error("GET", "/items/db01")[1]
    assert unprotected["code"] == "ITEM_NOT_FOUND" and "protect it first" in unprotected["message"]
    missing = protected.error("GET", "/items/nosuch")[1]  # no such VM: protecting is not the fix
    assert missing["code"] == "ITEM_NOT_FOUND" and "protect it first" not in missing["message"]
    assert "`siterecovery vm list`" in missing["message"], missing
    assert protected.error("GET", "/jobs/j000000000000")[1]["code"] == "JOB_NOT_FOUND"
    assert protected.error("POST", "/items/db01/replicate", json={})[1]["code"] == "ITEM_NOT_FOUND"
    status, error = protected.error("GET", "/vms/web01/check", params={"point": "web01-999999"})
    assert (status, error["code"]) == (404, "POINT_NOT_FOUND")
    body = {"name": "web02", "host": "nohost"}
    assert protected.error("POST", "/vms", json=body)[1]["code"] == "HOST_NOT_FOUND"
    body = {"name": "web02", "host": "hv01", "disks": ["1X"]}
    assert protected.error("POST", "/vms", json=body)[1]["code"] == "INVALID_INPUT"
    body = {"name": "web02", "host": "hv01", "switch": "vswitch-dmz"}
    assert protected.error("POST", "/vms", json=body)[1]["code"] == "INVALID_INPUT"
    body = {"name": "web01", "host": "hv01"}
    assert protected.error("POST", "/vms", json=body)[1]["code"] == "ALREADY_EXISTS"
    finished = protected.call("GET", "/jobs")[0]["id"]
    assert protected.error("POST", f"/jobs/{finished}/cancel")[1]["code"] == "JOB_FINISHED"
    # The lab keeps its hosts' kind: a local lab does not become a libvirt one.
    for provider in ("libvirt", "xen"):
        status, error = protected.error("POST", "/lab/up", json={"provider": provider})
        assert (status, error["code"]) == (400, "INVALID_INPUT"), error
    assert "lab up --provider local" in error["message"] or "xen" in error["message"]
    got_exit, document = _cli(vault, "lab", "up", "--provider", "libvirt")
    assert got_exit == 2 and "lab up --provider local" in document["error"]["message"], document
    assert not (vault / "lab-hosts").exists()  # no private libvirtd was started
    assert vault_snapshot(protected, vault) == before


def test_api_requires_the_token(daemon: Daemon) -> None:
    assert daemon.client is not None
    url = str(daemon.client.base_url).rstrip("/")
    import httpx

    assert httpx.get(f"{url}/items").status_code == 401
    bad = httpx.get(f"{url}/items", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "UNAUTHORIZED"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_openapi_documents_every_route(daemon: Daemon) -> None:
    assert daemon.client is not None
    root = str(daemon.client.base_url).removesuffix("/").removesuffix("/api/v1")
    import httpx

    assert httpx.get(f"{root}/docs").status_code == 200
    paths = httpx.get(f"{root}/openapi.json").json()["paths"]
    for path in ("/api/v1/items", "/api/v1/items/{vm}/replicate", "/api/v1/jobs/{job_id}/cancel",
                 "/api/v1/vms/{name}/check", "/api/v1/lab/up"):  # fmt: skip
        assert path in paths


def test_a_huge_name_is_not_echoed_back_whole(daemon: Daemon, vault: Path) -> None:
    before = vault_snapshot(daemon, vault)
    huge = "v" * 5000
    for method, path, body in (
        ("POST", "/items", {"vm": huge, "to": "cloud"}),
        ("GET", f"/items/{huge}", None),
        ("POST", "/vms", {"name": huge, "host": "hv01"}),
    ):
        status, error = daemon.error(method, path, json=body)
        assert status in (400, 404), (status, error["code"])
        assert "(5000 characters)" in error["message"] and len(error["message"]) < 500, error
        assert len(json.dumps(error)) < 1500, error["code"]
    assert vault_snapshot(daemon, vault) == before
