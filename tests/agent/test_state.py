"""The agent directory and join tokens, in process (agent/state.py, agent/tokens.py)."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import pytest

from siterecovery.agent import state, tokens
from siterecovery.domain.errors import InvalidInput, JoinTokenRefused


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    state.init(tmp_path / "a", "east")
    return tmp_path / "a"


def test_token_format(agent_dir: Path) -> None:
    token = state.new_token(agent_dir)
    assert token.startswith("srj1-")
    body = token.removeprefix("srj1-")
    doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert set(doc) == {"f", "t", "s"}
    assert doc["f"] == state.load(agent_dir).fingerprint
    assert doc["s"] == "east"
    assert tokens.parse(token) == tokens.JoinToken(doc["f"], doc["t"], "east")
    # Only the digest is kept: the token's text is in no file of the directory.
    stored = [p for p in agent_dir.rglob("*") if p.is_file()]
    assert all(doc["t"] not in p.read_text() for p in stored)
    assert (agent_dir / "tokens" / tokens.digest(token)).is_file()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "srj1-",
        "srj1-!!!",
        "srj1-" + base64.urlsafe_b64encode(b"[1, 2]").decode(),
        "srj1-" + base64.urlsafe_b64encode(b'{"f": "x", "t": "y", "s": "z"}').decode(),
        "srj2-" + "A" * 40,
        "srj1-" + "A" * 2000,
    ],
)
def test_malformed_tokens(agent_dir: Path, text: str) -> None:
    with pytest.raises(JoinTokenRefused) as refused:
        state.consume_token(agent_dir, text)
    assert refused.value.code == "JOIN_TOKEN_REFUSED"
    assert refused.value.fields["reason"].startswith("malformed")


def test_consume_once(agent_dir: Path) -> None:
    token = state.new_token(agent_dir)
    state.consume_token(agent_dir, token)
    with pytest.raises(JoinTokenRefused, match="already used"):
        state.consume_token(agent_dir, token)
    assert (agent_dir / "tokens" / "used" / tokens.digest(token)).is_file()


def test_consume_races_one_winner(agent_dir: Path) -> None:
    token = state.new_token(agent_dir)
    start = threading.Barrier(16)
    outcomes: list[str] = []

    def consume() -> None:
        start.wait()
        try:
            state.consume_token(agent_dir, token)
            outcomes.append("won")
        except JoinTokenRefused as e:
            outcomes.append(e.fields["reason"])

    threads = [threading.Thread(target=consume) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["already used"] * 15 + ["won"]


def test_unknown_and_expired(agent_dir: Path) -> None:
    other = tokens.make(state.load(agent_dir).fingerprint, "east")
    with pytest.raises(JoinTokenRefused, match="unknown"):
        state.consume_token(agent_dir, other)
    token = state.new_token(agent_dir, ttl=0.05)
    time.sleep(0.1)
    with pytest.raises(JoinTokenRefused, match="expired"):
        state.consume_token(agent_dir, token)
    assert (agent_dir / "tokens" / tokens.digest(token)).is_file()  # not used up


def test_old_tokens_are_pruned(agent_dir: Path) -> None:
    old = state.new_token(agent_dir, ttl=-2 * state.PRUNE_AFTER)
    used = state.new_token(agent_dir)
    state.consume_token(agent_dir, used)
    state.new_token(agent_dir)
    assert not (agent_dir / "tokens" / tokens.digest(old)).exists()
    assert (agent_dir / "tokens" / "used" / tokens.digest(used)).exists()


def test_secrets(agent_dir: Path) -> None:
    assert not state.check_secret(agent_dir, "s1")
    state.add_secret(agent_dir, "s1")
    state.add_secret(agent_dir, "s2")
    assert state.check_secret(agent_dir, "s1")
    assert state.check_secret(agent_dir, "s2")
    assert not state.check_secret(agent_dir, "s3")
    assert not state.check_secret(agent_dir, "")
    text = (agent_dir / "secrets.json").read_text()
    assert "s1" not in text.replace("secrets", "")
    assert len(json.loads(text)["secrets"]) == 2


def test_init_is_idempotent_and_keeps_its_identity(agent_dir: Path) -> None:
    before = state.load(agent_dir)
    again = state.init(agent_dir, "east")
    assert again == before
    assert again.identity.cert_pem == before.identity.cert_pem


def test_init_refuses_another_site_and_a_foreign_directory(agent_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="agent directory of site 'east'"):
        state.init(agent_dir, "west")
    assert state.load(agent_dir).site == "east"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInput, match="not an agent directory"):
        state.init(foreign, "west")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(InvalidInput, match="site"):
        state.init(tmp_path / "bad", "no spaces")


def test_load_refuses_a_directory_without_agent(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="agent init"):
        state.load(tmp_path)
