"""Input the API must not misread: unknown fields, durations as it answers them,
and site storage paths that would let a VM deletion reach files not ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ..conftest import Daemon


@pytest.fixture
def protected(daemon: Daemon) -> Daemon:
    body = {"vm": "web01", "to": "cloud", "interval": "1h"}
    job = daemon.wait_job(daemon.call("POST", "/items", json=body)["job"])
    assert job["state"] == "succeeded", job
    return daemon


def test_a_typo_in_dry_run_is_refused_and_starts_nothing(protected: Daemon) -> None:
    before = protected.call("GET", "/jobs")
    body = {"type": "test", "dryrun": True}
    status, error = protected.error("POST", "/items/web01/failover", json=body)
    assert (status, error["code"]) == (400, "INVALID_INPUT")
    assert error["message"].startswith("dryrun:")
    assert error["details"]["field"] == "dryrun"
    assert protected.call("GET", "/jobs") == before
    assert protected.call("GET", "/items/web01")["state"] == "protected"


def test_the_policy_get_answers_is_accepted_back(protected: Daemon) -> None:
    policy = protected.call("GET", "/items/web01")["policy"]
    assert isinstance(policy["interval"], float) and isinstance(policy["max_rate"], int)
    changed = {**policy, "interval": policy["interval"] * 2, "max_rate": 50 << 20}
    after = protected.call("PATCH", "/items/web01", json=changed)["policy"]
    assert after == changed
    job = protected.call("POST", "/items", json={"vm": "db01", "to": "cloud", **after})
    assert protected.wait_job(job["job"])["state"] == "succeeded"
    assert protected.call("GET", "/items/db01")["policy"] == after


UNKNOWN_FIELDS = [
    ("POST", "/sites", {"name": "x", "path": "TMP/x", "paht": "/"}, "paht"),
    ("POST", "/hosts", {"site": "onprem", "name": "h", "switch": "s"}, "switch"),
    ("PATCH", "/hosts/hv01", {"connected": True, "conected": False}, "conected"),
    ("POST", "/vms", {"name": "v", "host": "hv01", "disk": "1G"}, "disk"),
    ("POST", "/items", {"vm": "db01", "to": "cloud", "intervall": "5m"}, "intervall"),
    ("PATCH", "/items/web01", {"retension": "1d"}, "retension"),
    ("POST", "/items/web01/replicate", {"app_consistant": True}, "app_consistant"),
    ("POST", "/items/web01/commit", {"dryrun": True}, "dryrun"),
    ("POST", "/keys", {"name": "k", "material": "00"}, "material"),
    ("POST", "/groups", {"name": "g", "vms": ["web01"], "every": 5}, "every"),
    ("POST", "/plans", {"name": "p", "desc": "x"}, "desc"),
    ("POST", "/plans/p/failover", {"type": "test", "dryrun": True}, "dryrun"),
]


def test_unknown_fields_are_refused_naming_them(protected: Daemon, tmp_path: Path) -> None:
    jobs = protected.call("GET", "/jobs")
    for method, path, body, field in UNKNOWN_FIELDS:
        if "path" in body:  # were it accepted, it would stay in the test's directory
            body = {**body, "path": body["path"].replace("TMP", str(tmp_path))}
        status, error = protected.error(method, path, json=body)
        assert (status, error["code"], error["details"]["field"]) == (400, "INVALID_INPUT", field)
        assert field in error["message"] and "unknown field" in error["message"]
    assert protected.call("GET", "/jobs") == jobs
    assert [s["name"] for s in protected.call("GET", "/sites")] == ["cloud", "onprem"]
    assert protected.call("GET", "/keys") == [] and protected.call("GET", "/plans") == []


def test_routes_and_methods_we_lack_answer_our_document(daemon: Daemon) -> None:
    assert daemon.client is not None
    missing = daemon.client.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
    wrong = daemon.client.put("/items")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    broken = daemon.client.post("/sites", content=b"{not json", headers=_json)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "INVALID_INPUT"


_json = {"Content-Type": "application/json"}


def test_values_out_of_range_are_usage_errors(daemon: Daemon) -> None:
    """Python's JSON reads NaN and Infinity; sizes and durations have bounds: all 400,
    none reaching qemu-img (502) or a date computation (the scheduler)."""
    assert daemon.client is not None
    raw = b'{"name": "g1", "vms": ["web01"], "common_interval": NaN}'
    nan = daemon.client.post("/groups", content=raw, headers=_json)
    assert (nan.status_code, nan.json()["error"]["details"]["field"]) == (400, "common_interval")
    assert "a duration" in nan.json()["error"]["message"]
    cases = [
        ("/vms", {"name": "big", "host": "hv01", "disks": ["9999999T"]}, "disk"),
        ("/vms", {"name": "big", "host": "hv01", "disks": [1 << 70]}, "disk"),
        ("/vms", {"name": "big", "host": "hv01", "disks": [True]}, "disks.0"),
        ("/items", {"vm": "web01", "to": "cloud", "interval": 1e308}, "interval"),
        (
            "/items",
            {"vm": "web01", "to": "cloud", "interval": "1h", "max_rate": 1 << 70},
            "max-rate",
        ),
    ]
    for path, body, field in cases:
        status, error = daemon.error("POST", path, json=body)
        assert (status, error["code"], error["details"]["field"]) == (400, "INVALID_INPUT", field)
    assert daemon.call("GET", "/items") == [] and daemon.call("GET", "/groups") == []
    assert "big" not in [vm["name"] for vm in daemon.call("GET", "/vms")]


def _site(path: str, name: str = "third") -> dict[str, Any]:
    return {"name": name, "path": path, "role": "cloud"}


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run the daemon from the test's directory: a relative path lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_site_paths_are_confined(in_tmp: Path, daemon: Daemon, vault: Path) -> None:
    tmp_path = in_tmp
    sites = daemon.call("GET", "/sites")
    onprem = vault / "sites" / "onprem"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not ours\n")
    (tmp_path / "to-root").symlink_to("/")
    # In this order: were confinement broken, a path inside the test's
    # directory is accepted first and the test stops before "/" is tried.
    refused = [
        (str(onprem / "vms" / "inner"), "overlaps"),
        (str(onprem), "overlaps"),
        (str(vault / "sites"), "overlaps"),
        (str(vault), "overlaps"),
        (str(foreign), "not a site of this name"),
        (str(foreign / "notes.txt"), "not a site of this name"),
        (str(tmp_path / ("x" * 300)), "cannot be"),
        ("relative/site", "not an absolute path"),
        ("", "not an absolute path"),
        (str(tmp_path / "to-root"), "root directory"),
        ("/", "root directory"),
    ]
    for path, reason in refused:
        status, error = daemon.error("POST", "/sites", json=_site(path))
        assert (status, error["code"]) == (400, "SITE_PATH_REFUSED"), (path, error)
        assert reason in error["message"], (path, error)
    assert daemon.call("GET", "/sites") == sites
    assert not (onprem / "vms" / "inner").exists() and not (tmp_path / "relative").exists()
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    made = daemon.call("POST", "/sites", json=_site(str(tmp_path / "new" / "../third")))
    assert made["path"] == str(tmp_path / "third")
    assert (tmp_path / "third" / "site.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert daemon.call("POST", "/sites", json=_site(str(empty), "fourth"))["path"] == str(empty)
