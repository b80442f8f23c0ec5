"""The agent's control API: HTTPS with its pinned certificate, one bearer secret per engine.

Routes (JSON bodies; every refusal is the one error document
``{"error": {"code", "message", "details"}}``, with the status of its category)::

    POST /v1/join {token}   no secret: uses the join token up (agent/state.py) and
                            answers {site, secret, version, fingerprint}; the
                            secret is new, and only its SHA-256 is kept
    GET  /v1/info           {site, version, time (epoch s, float), fingerprint,
                            operations: [{name, kind}]}
    POST /v1/call/NAME      body: the arguments (a JSON object; empty: {}).
                            With ``Accept: application/x-ndjson`` (what the
                            engine sends), or for a streaming operation:
                            application/x-ndjson, lines {"event": E}… then one
                            {"result": R} or {"error": DOC} (the status is 200
                            once the operation started), and an empty line every
                            HEARTBEAT s of silence. Otherwise (a unary operation,
                            another Accept): {"result": R}

Every route but ``join`` needs ``Authorization: Bearer SECRET``; without it, or
with a secret this agent did not issue, 401 ``AGENT_UNAUTHORIZED``. An
unknown operation is 404 ``NOT_FOUND``. There are no docs routes: nothing
else answers without a secret. Every call the engine makes is answered as a
stream, so no operation is bounded by the caller's read timeout however long
it runs (the digests of a large disk), while a lost agent or a cut link is
noticed within that timeout (the heartbeat stops). A streaming operation (its
events) is cancelled when its caller leaves; a unary one runs to its end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from siterecovery import __version__
from siterecovery.agent import state
from siterecovery.agent.registry import Args, Kind, Operation
from siterecovery.api.status import STATUS
from siterecovery.domain.errors import (
    AgentUnauthorized,
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    SiteRecoveryError,
    SyncCancelled,
    describe,
)

log = logging.getLogger("siterecovery.agent")

NDJSON = "application/x-ndjson"
QUEUED_EVENTS = 256
"""Events an operation may emit ahead of a slow reader before ``emit`` blocks."""
POLL = 0.5
"""Seconds between two checks that a streaming call's client is still there."""
HEARTBEAT = 2.0
"""Seconds of silence of a streamed call after which an empty line is sent: the
caller's read timeout (agent/client.py: SILENCE) then means a lost agent or a
cut link, never a quiet or a long operation."""


class JoinBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(max_length=1024)


def create_app(state_dir: Path, operations: Mapping[str, Operation]) -> FastAPI:
    """The agent's FastAPI app over the agent directory ``state_dir``."""
    agent = state.load(state_dir)
    app = FastAPI(title="siterecovery agent", version=__version__,
                  docs_url=None, redoc_url=None, openapi_url=None)  # fmt: skip
    _install_errors(app)
    secured = [Depends(_authorizer(agent.dir))]

    @app.post("/v1/join")
    def join(body: JoinBody) -> JSONResponse:
        state.consume_token(agent.dir, body.token)
        secret = secrets.token_urlsafe(32)
        state.add_secret(agent.dir, secret)
        doc = {"site": agent.site, "secret": secret, "version": __version__,
               "fingerprint": agent.fingerprint}  # fmt: skip
        return JSONResponse(doc, headers={"Cache-Control": "no-store"})

    @app.get("/v1/info", dependencies=secured)
    def info() -> dict[str, Any]:
        return {"site": agent.site, "version": __version__, "time": time.time(),
                "fingerprint": agent.fingerprint,
                "operations": [op.describe() for op in operations.values()]}  # fmt: skip

    @app.post("/v1/call/{name}", dependencies=secured)
    async def call(name: str, request: Request) -> Any:
        operation = operations.get(name)
        if operation is None:
            raise NotFound(kind="operation", name=name)
        args = _arguments(await request.body())
        if operation.kind is Kind.STREAMING:
            return StreamingResponse(_stream(operation, args), media_type=NDJSON)
        if NDJSON in request.headers.get("accept", ""):
            return StreamingResponse(_stream(_unary_streamed(operation), args), media_type=NDJSON)
        result = await run_in_threadpool(operation.function, args)
        return JSONResponse({"result": result})

    return app


def _authorizer(directory: Path) -> Callable[[Request], None]:
    def require_secret(request: Request) -> None:
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            reason = "this agent needs 'Authorization: Bearer SECRET' (the secret of a join)"
            raise AgentUnauthorized(reason=reason)
        if not state.check_secret(directory, secret.strip()):
            reason = "this agent did not issue that secret (join it again with a new token)"
            raise AgentUnauthorized(reason=reason)

    return require_secret


def _arguments(body: bytes) -> Args:
    try:
        args = json.loads(body) if body.strip() else {}
    except ValueError:
        raise InvalidInput(field="body", reason="not JSON") from None
    if not isinstance(args, dict):
        raise InvalidInput(field="body", reason="the arguments must be a JSON object")
    return args


# -- streaming -------------------------------------------------------------------


def _unary_streamed(operation: Operation) -> Operation:
    """A unary operation run as a stream: no events, its result, and heartbeats."""
    unary = operation.function
    return dataclasses.replace(operation, function=lambda args, _emit: unary(args))


async def _stream(operation: Operation, args: Args) -> AsyncIterator[bytes]:
    """The lines of a streaming call: the operation runs in its own thread and
    hands lines over a bounded queue. When the client goes away, Starlette
    cancels this generator (within POLL s); the operation's next ``emit`` then
    raises SyncCancelled."""
    lines: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUED_EVENTS)
    gone = threading.Event()

    def put(line: bytes) -> None:
        while True:
            if gone.is_set():
                raise SyncCancelled(what=f"operation '{operation.name}' (the caller went away)")
            try:
                lines.put(line, timeout=POLL)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            result = operation.function(args, lambda event: put(_line({"event": event})))
            final = _line({"result": result})
        except Exception as error:
            _log_unexpected(operation, error)
            final = _line({"error": describe(error)})
        try:
            put(final)
        except SyncCancelled:
            pass
        finally:
            lines.put(None)

    threading.Thread(target=work, name=f"agent-{operation.name}", daemon=True).start()
    quiet = 0.0
    try:
        while (line := await run_in_threadpool(_next_line, lines)) is not None:
            quiet = 0.0 if line else quiet + POLL
            if line or quiet >= HEARTBEAT:
                quiet = 0.0
                yield line or b"\n"
    finally:
        gone.set()


def _next_line(lines: queue.Queue[bytes | None]) -> bytes | None:
    """The next line, None at the end, b"" after POLL s without one (so that a
    cancelled stream is not stuck in a thread waiting for a silent operation)."""
    try:
        return lines.get(timeout=POLL)
    except queue.Empty:
        return b""


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def _log_unexpected(operation: Operation, error: Exception) -> None:
    if not isinstance(error, SiteRecoveryError):
        log.error("operation %s failed", operation.name, exc_info=error)


# -- errors ----------------------------------------------------------------------


def _install_errors(app: FastAPI) -> None:
    app.add_exception_handler(SiteRecoveryError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


def _document(error: SiteRecoveryError, status: int | None = None) -> JSONResponse:
    return JSONResponse({"error": error.to_dict()}, status_code=status or STATUS[error.category])


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SiteRecoveryError)
    return _document(exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return _document(InvalidInput(field=where, reason=str(first.get("msg", "invalid"))))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    error: SiteRecoveryError
    if exc.status_code == 401:
        error = AgentUnauthorized(reason=str(exc.detail))
    elif exc.status_code == 404:
        error = NotFound(kind="route", name=request.url.path)
    elif exc.status_code == 405:
        error = MethodNotAllowed(method=request.method, path=request.url.path)
    elif exc.status_code < 500:
        error = InvalidInput(field="request", reason=str(exc.detail))
    else:
        error = InternalError(detail=str(exc.detail))
    return _document(error, exc.status_code)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    return _document(InternalError(detail=f"{type(exc).__name__}: {exc}"))


# -- the process -----------------------------------------------------------------


def serve(
    state_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8471,
    operations: Mapping[str, Operation] | None = None,
) -> None:
    """Serve the agent until SIGTERM/SIGINT. Once it accepts connections it
    writes ``DIR/agent-url.json`` ``{"url", "pid"}`` (port 0: the port taken),
    removed when it stops; files it makes are private (umask 077)."""
    os.umask(0o077)
    agent = state.load(state_dir)
    app = create_app(agent.dir, operations or {})
    sock = _bind(host, port)
    url = f"https://{_url_host(host)}:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app,
        ssl_certfile=str(agent.identity.cert),
        ssl_keyfile=str(agent.identity.key),
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )

    def started() -> None:
        state.write_url(agent.dir, url)
        print(f"agent of site '{agent.site}' on {url} (certificate {agent.fingerprint})",
              file=sys.stderr, flush=True)  # fmt: skip

    try:
        _Server(config, started, lambda: state.remove_url(agent.dir)).run(sockets=[sock])
    finally:
        state.remove_url(agent.dir)
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server, calling ``on_started`` once it accepts connections and
    ``on_stopping`` when it begins to shut down (uvicorn re-raises SIGTERM once
    it has stopped: code after ``run`` may never execute)."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_started: Callable[[], None],
        on_stopping: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._on_stopping = on_stopping

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_stopping()
        for connection in list(self.server_state.connections):
            _abort_if_idle(connection)
        await super().shutdown(sockets=sockets)


def _abort_if_idle(connection: Any) -> None:
    """Drop at once a kept-alive connection with no request in flight: closing it
    gracefully, TLS waits for the peer's close_notify, which an idle pooled
    client never sends, and the stop would wait the whole graceful timeout.
    (uvicorn's own idle test; without those attributes, the timeout it is.)"""
    cycle, transport = getattr(connection, "cycle", None), getattr(connection, "transport", None)
    if transport is not None and (cycle is None or getattr(cycle, "response_complete", False)):
        transport.abort()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
