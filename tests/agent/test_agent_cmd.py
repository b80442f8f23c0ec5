"""``siterecovery agent init|token``: the command line (argparse, exit codes, --json)."""

from __future__ import annotations

import pytest

from tests.agent.conftest import Agent, snapshot


def test_init_json_and_idempotent(fresh: Agent) -> None:
    before = snapshot(fresh.dir)
    result = fresh.cli("agent", "init", "--dir", str(fresh.dir), "--site", "south", "--json")
    assert result.code == 0
    doc = result.doc()
    assert (doc["site"], doc["dir"]) == ("south", str(fresh.dir))
    assert doc["fingerprint"] == fresh.fingerprint
    assert snapshot(fresh.dir) == before


def test_init_refuses_another_site(fresh: Agent) -> None:
    before = snapshot(fresh.dir)
    result = fresh.cli("agent", "init", "--dir", str(fresh.dir), "--site", "north", "--json")
    assert result.code == 2
    error = result.doc()["error"]
    assert error["code"] == "INVALID_INPUT"
    assert "site 'south'" in error["message"]
    assert snapshot(fresh.dir) == before


def test_token_prints_the_token_alone(fresh: Agent) -> None:
    result = fresh.cli("agent", "token", "--dir", str(fresh.dir), "--ttl", "10m")
    assert result.code == 0
    assert result.out.startswith("srj1-") and result.out.count("\n") == 1
    assert "south" in result.err


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (["agent", "token", "--dir", "nowhere", "--json"], 2, "INVALID_INPUT"),
        (["agent", "token", "--dir", "DIR", "--ttl", "soon", "--json"], 2, "INVALID_INPUT"),
        (["agent", "serve", "--dir", "DIR", "--listen", "nohost", "--json"], 2, "INVALID_INPUT"),
        (["agent", "--json"], 2, "USAGE"),
        (["agent", "init", "--dir", "DIR", "--json"], 2, "USAGE"),
    ],
    ids=["not-an-agent", "bad-ttl", "bad-listen", "no-action", "no-site"],
)
def test_refusals(fresh: Agent, args: list[str], code: int, error: str) -> None:
    before = snapshot(fresh.dir)
    result = fresh.cli(*[str(fresh.dir) if a == "DIR" else a for a in args])
    assert result.code == code, result.err
    assert result.doc()["error"]["code"] == error
    assert snapshot(fresh.dir) == before
    assert list(fresh.cwd.iterdir()) == []


def test_help(fresh: Agent) -> None:
    result = fresh.cli("agent", "serve", "--help")
    assert result.code == 0
    assert "--listen" in result.out
    listing = fresh.cli("--help")
    assert listing.code == 0
    assert "agent" in listing.out
