"""``siterecovery agent serve`` as a process: join, calls, streams and every refusal.

Each refusal asserts the error code and that the agent directory did not change.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from siterecovery import __version__
from siterecovery.agent import state, tls, tokens
from siterecovery.agent.client import AgentClient, Joined, join
from siterecovery.domain.errors import (
    AgentCertificateMismatch,
    AgentUnauthorized,
    AgentUnreachable,
    DiskError,
    InvalidInput,
    JoinTokenRefused,
    NotFound,
)
from tests.agent.conftest import Agent, settled, snapshot

# -- join, info, calls ---------------------------------------------------------------


def test_join_and_info(east: Agent, east_joined: Joined, east_client: AgentClient) -> None:
    assert east_joined.site == "east"
    assert east_joined.version == __version__
    assert east_joined.fingerprint == east.fingerprint == tls.fingerprint(east_joined.cert_pem)
    assert "secret" not in repr(east_joined)
    info = east_client.info()
    assert (info.site, info.version, info.fingerprint) == ("east", __version__, east.fingerprint)
    assert {"echo": "unary", "count": "streaming"}.items() <= info.operations.items()
    # The site's own operations, transfers included.
    assert info.operations["site.chain"] == "unary"
    assert info.operations["site.send_disk"] == "streaming"
    assert info.operations["site.receive_point"] == "unary"  # it serves a wire port
    assert 0 < info.round_trip < 5
    assert abs(info.clock_offset) < 0.5  # same machine, same clock


def test_call_echo(east_client: AgentClient) -> None:
    args = {"name": "x", "n": [1, 2.5, None], "nested": {"ok": True}}
    assert east_client.call("echo", **args) == {"args": args}
    assert east_client.call("echo") == {"args": {}}


def test_stream_count_with_events(east_client: AgentClient) -> None:
    events: list[dict[str, Any]] = []
    assert east_client.stream("count", events.append, n=5) == {"count": 5}
    assert events == [{"i": i} for i in range(5)]
    assert east_client.call("count", n=2) == {"count": 2}  # events dropped


def test_operation_errors_keep_their_class(east_client: AgentClient) -> None:
    with pytest.raises(InvalidInput) as refused:
        east_client.call("echo", refuse="not today")
    assert refused.value.code == "INVALID_INPUT"
    assert refused.value.fields == {"field": "refuse", "reason": "not today"}
    events: list[dict[str, Any]] = []
    with pytest.raises(DiskError, match="count failed at 2"):
        east_client.stream("count", events.append, n=5, fail_at=2)
    assert events == [{"i": 0}, {"i": 1}]
    with pytest.raises(InvalidInput, match="n: must be an integer"):
        east_client.stream("count", events.append, n="many")


def test_unknown_operation_is_not_found(east: Agent, east_client: AgentClient) -> None:
    with pytest.raises(NotFound) as refused:
        east_client.call("vm.teleport")
    assert refused.value.code == "NOT_FOUND"
    assert "vm.teleport" in str(refused.value)


def test_a_failing_event_handler_ends_the_stream(east_client: AgentClient) -> None:
    seen: list[dict[str, Any]] = []

    def stop_at_two(event: dict[str, Any]) -> None:
        seen.append(event)
        if len(seen) == 2:
            raise RuntimeError("enough")

    with pytest.raises(RuntimeError, match="enough"):
        east_client.stream("count", stop_at_two, n=200, delay=0.01)
    assert len(seen) == 2
    assert east_client.call("echo", still="here") == {"args": {"still": "here"}}


def test_concurrent_calls_share_one_client(east_client: AgentClient) -> None:
    results: list[Any] = []

    def work(i: int) -> None:
        results.append(east_client.stream("count", None, n=3, delay=0.02)["count"] + i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [3 + i for i in range(8)]


# -- refusals: credentials -------------------------------------------------------


def _raw(agent: Agent, headers: dict[str, str] | None = None) -> httpx.Client:
    """A pinned HTTPS client without our error translation."""
    context = tls.client_context(agent.cert_pem)
    return httpx.Client(base_url=agent.url, verify=context, headers=headers, trust_env=False)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic YTpi"},
        {"Authorization": "Bearer not-a-secret"},
    ],
    ids=["none", "empty", "basic", "wrong"],
)
def test_without_a_valid_secret_401(east: Agent, headers: dict[str, str]) -> None:
    before = settled(east)
    with _raw(east, headers) as raw:
        answers = [raw.get("/v1/info"), raw.post("/v1/call/echo", json={"a": 1}),
                   raw.post("/v1/call/no-such-op")]  # fmt: skip
    for answer in answers:
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "AGENT_UNAUTHORIZED"
    assert settled(east) == before


def test_another_agents_secret_is_refused(east: Agent, west: Agent, east_joined: Joined) -> None:
    west_joined = west.join()
    before = settled(west), settled(east)
    with AgentClient(west.url, west.cert_pem, east_joined.secret, site="west") as crossed:
        with pytest.raises(AgentUnauthorized) as refused:
            crossed.info()
        assert refused.value.code == "AGENT_UNAUTHORIZED"
        with pytest.raises(AgentUnauthorized):
            crossed.call("echo")
    with (
        AgentClient(east.url, east.cert_pem, west_joined.secret, site="east") as crossed,
        pytest.raises(AgentUnauthorized),
    ):
        crossed.info()
    assert (settled(west), settled(east)) == before


# -- refusals: join tokens -------------------------------------------------------


def test_replayed_token_refused(east: Agent) -> None:
    token = east.token()  # through `siterecovery agent token`
    east.join(token)
    before = settled(east)
    with pytest.raises(JoinTokenRefused) as refused:
        east.join(token)
    assert refused.value.code == "JOIN_TOKEN_REFUSED"
    assert refused.value.fields["reason"] == "already used"
    assert settled(east) == before


def test_concurrent_joins_with_one_token_one_wins(east: Agent) -> None:
    token = east.quick_token()
    secrets_before = _secrets(east)
    start = threading.Barrier(8)
    won: list[Joined] = []
    refused: list[str] = []

    def attempt() -> None:
        start.wait()
        try:
            won.append(join(east.url, token))
        except JoinTokenRefused as e:
            refused.append(e.fields["reason"])

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert refused == ["already used"] * 7
    assert len(_secrets(east)) == len(secrets_before) + 1
    with east.client(won[0]) as client:
        assert client.info().site == "east"


def test_expired_token_refused(east: Agent) -> None:
    token = east.quick_token(ttl=0.2)
    time.sleep(0.3)
    before = settled(east)
    with pytest.raises(JoinTokenRefused) as refused:
        east.join(token)
    assert refused.value.fields["reason"].startswith("expired at ")
    assert settled(east) == before


def test_malformed_and_unknown_tokens_refused(east: Agent) -> None:
    before = settled(east)
    with pytest.raises(JoinTokenRefused, match="malformed"):
        join("https://127.0.0.1:1", "srj1-nonsense")  # refused before connecting
    with _raw(east) as raw:
        answer = raw.post("/v1/join", json={"token": "srj1-nonsense"})
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "JOIN_TOKEN_REFUSED"
        assert "malformed" in answer.json()["error"]["details"]["reason"]
        answer = raw.post("/v1/join", json={"token": "x", "engine": "typo"})
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "INVALID_INPUT"
    never_issued = tokens.make(east.fingerprint, "east")
    with pytest.raises(JoinTokenRefused, match="unknown"):
        east.join(never_issued)
    assert settled(east) == before


def test_wrong_pinned_fingerprint(east: Agent) -> None:
    token = east.quick_token()
    real = tokens.parse(token)
    forged = tokens.encode(tokens.JoinToken("sha256:" + "0" * 64, real.random, real.site))
    before = settled(east)
    with pytest.raises(AgentCertificateMismatch) as refused:
        join(east.url, forged)
    assert refused.value.code == "AGENT_CERT_MISMATCH"
    assert refused.value.fields["got"] == east.fingerprint
    assert settled(east) == before  # nothing was sent: the real token still works
    assert join(east.url, token).site == "east"


def test_client_trusting_another_certificate_gets_a_mismatch(
    east: Agent, west: Agent, east_joined: Joined
) -> None:
    with (
        AgentClient(east.url, west.cert_pem, east_joined.secret, site="east") as wrong,
        pytest.raises(AgentCertificateMismatch) as refused,
    ):
        wrong.info()
    assert refused.value.fields["got"] == east.fingerprint
    assert refused.value.fields["expected"] == west.fingerprint
    # Joining west's token at east's address fails the same way, before sending it.
    with pytest.raises(AgentCertificateMismatch):
        join(east.url, west.quick_token())


def test_stopped_agent_is_unreachable(fresh: Agent) -> None:
    fresh.start()
    joined = fresh.join()
    with fresh.client(joined, timeout=5) as client:
        assert client.call("echo", x=1) == {"args": {"x": 1}}
        fresh.stop()
        assert not (fresh.dir / state.URL_FILE).exists()
        for attempt in (client.info, lambda: client.call("echo")):
            with pytest.raises(AgentUnreachable) as refused:
                attempt()
            assert refused.value.code == "AGENT_UNREACHABLE"
            assert refused.value.fields["site"] == "south"
            assert refused.value.fields["url"] == fresh.url
            assert "'south'" in str(refused.value) and fresh.url in str(refused.value)
    with pytest.raises(AgentUnreachable) as refused:
        join(fresh.url, fresh.quick_token())
    assert refused.value.fields["site"] == "south"


# -- the agent directory -----------------------------------------------------------


def test_modes(east: Agent, east_joined: Joined) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(east.dir) == 0o700
    assert mode(east.dir / "tokens") == mode(east.dir / "tokens" / "used") == 0o700
    assert mode(east.dir / "agent.key") == 0o600
    assert mode(east.dir / "secrets.json") == 0o600
    for path in (east.dir / "tokens").rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path


def test_a_session_writes_only_the_documented_files(fresh: Agent) -> None:
    used = fresh.token()
    pending = fresh.token()
    fresh.start()
    joined = fresh.join(used)
    with fresh.client(joined) as client:
        client.info()
        client.call("echo", a=1)
        client.stream("count", None, n=3)
        with pytest.raises(JoinTokenRefused):
            fresh.join(used)
    assert set(snapshot(fresh.dir)) >= {state.URL_FILE}
    fresh.stop()
    assert sorted(snapshot(fresh.dir)) == sorted(
        ["agent.json", "agent.crt", "agent.key", "secrets.json", "tokens", "tokens/used",
         f"tokens/used/{tokens.digest(used)}", f"tokens/{tokens.digest(pending)}"]
    )  # fmt: skip
    assert list(fresh.cwd.iterdir()) == []
    assert list(fresh.home.iterdir()) == []
    assert len(_secrets(fresh)) == 1
    assert joined.secret not in (fresh.dir / "secrets.json").read_text()


def _secrets(agent: Agent) -> list[dict[str, Any]]:
    return list(json.loads((agent.dir / "secrets.json").read_text())["secrets"])
