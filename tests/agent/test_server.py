"""The agent's app in this process, with operations of the test's own (agent/server.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from siterecovery.agent import server, state
from siterecovery.agent.client import AgentClient, Joined, join
from siterecovery.agent.registry import Args, Emit, Operations
from siterecovery.agent.server import _bind, create_app
from siterecovery.domain.errors import AgentUnreachable, AlreadyExists, InternalError, InvalidInput

ops = Operations()
stopped: list[tuple[int, str]] = []


@ops.streaming("slow")
def slow(args: Args, emit: Emit) -> Any:
    i = 0
    try:
        for i in range(200):
            emit({"i": i})
            time.sleep(0.02)
    except BaseException as e:
        stopped.append((i, type(e).__name__))
        raise
    return "finished"


@ops.streaming("quiet")
def quiet(args: Args, emit: Emit) -> Any:
    time.sleep(float(args["seconds"]))
    return "after a silence"


@ops.unary("sleep")
def sleep(args: Args) -> Any:
    time.sleep(float(args["seconds"]))


@ops.unary("crash")
def crash(args: Args) -> Any:
    raise RuntimeError("a bug")


@ops.unary("unjsonable")
def unjsonable(args: Args) -> Any:
    return {1, 2}


@ops.streaming("unjsonable_event")
def unjsonable_event(args: Args, emit: Emit) -> Any:
    emit({"when": object()})


@pytest.fixture(scope="module")
def joined(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Joined]]:
    """The URL of an agent served by this process, and a join to it."""
    directory = tmp_path_factory.mktemp("inproc") / "agent"
    agent = state.init(directory, "inproc")
    sock = _bind("127.0.0.1", 0)
    config = uvicorn.Config(create_app(directory, ops), ssl_certfile=str(agent.identity.cert),
                            ssl_keyfile=str(agent.identity.key), log_level="critical",
                            lifespan="off")  # fmt: skip
    uvicorn_server = uvicorn.Server(config)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uvicorn_server.started:
        time.sleep(0.02)
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"
    yield url, join(url, state.new_token(directory))
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def client(joined: tuple[str, Joined]) -> Iterator[AgentClient]:
    url, found = joined
    with AgentClient(url, found.cert_pem, found.secret, site="inproc") as made:
        yield made


def test_a_stream_whose_caller_leaves_is_cancelled(client: AgentClient) -> None:
    seen: list[Any] = []

    def leave_at_three(event: dict[str, Any]) -> None:
        seen.append(event)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        client.stream("slow", leave_at_three)
    deadline = time.monotonic() + 3
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stopped and stopped[0][1] == "SyncCancelled"
    assert stopped[0][0] < 100  # long before its end


def test_a_quiet_stream_outlives_the_read_timeout(
    joined: tuple[str, Joined], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, found = joined
    monkeypatch.setattr(server, "HEARTBEAT", 0.5)
    with AgentClient(url, found.cert_pem, found.secret, site="inproc", timeout=1.2) as impatient:
        assert impatient.stream("quiet", None, seconds=2.5) == "after a silence"
        # A unary operation is streamed too (the client asks for NDJSON): it
        # outlives the read timeout, and the caller sees its heartbeats.
        beats: list[dict[str, Any]] = []
        assert impatient.stream("sleep", beats.append, seconds=2.5) is None
        assert beats and all(beat == {} for beat in beats)


def test_a_silent_agent_is_unreachable_within_the_read_timeout(
    joined: tuple[str, Joined], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No heartbeat (as behind a cut link): the call ends after the read
    timeout, saying the agent may still be carrying it out."""
    url, found = joined
    monkeypatch.setattr(server, "HEARTBEAT", 60.0)
    with (
        AgentClient(url, found.cert_pem, found.secret, site="inproc", timeout=1.2) as impatient,
        pytest.raises(AgentUnreachable, match="may still be carrying"),
    ):
        impatient.call("sleep", seconds=4)  # its answer would have come


def test_a_caller_that_does_not_ask_for_a_stream_gets_one_document(
    joined: tuple[str, Joined],
) -> None:
    url, found = joined
    with AgentClient(url, found.cert_pem, found.secret, site="inproc") as made:
        response = made._http.post("/v1/call/sleep", json={"seconds": 0}, headers={"Accept": "*/*"})
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"result": None}


def test_foreign_errors_are_internal(client: AgentClient) -> None:
    with pytest.raises(InternalError, match="RuntimeError: a bug"):
        client.call("crash")
    with pytest.raises(InternalError, match="TypeError"):
        client.call("unjsonable")
    with pytest.raises(InternalError, match="TypeError"):
        client.stream("unjsonable_event", None)
    assert client.info().site == "inproc"


def test_a_name_is_registered_once() -> None:
    with pytest.raises(AlreadyExists):
        ops.unary("crash")(crash)
    assert sorted(ops) == ["crash", "quiet", "sleep", "slow", "unjsonable", "unjsonable_event"]


def test_agent_dir_must_be_initialised(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="agent init"):
        create_app(tmp_path, ops)
