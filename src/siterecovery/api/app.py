"""The FastAPI application: routes per resource, one error mapping, token auth.

Only this layer knows HTTP statuses: they follow the error category.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from siterecovery import __version__, portal
from siterecovery.api import failover, inventory, keys, protection, recovery
from siterecovery.api.deps import require_token
from siterecovery.api.status import STATUS
from siterecovery.context import Context
from siterecovery.domain.errors import (
    InternalError,
    InvalidInput,
    MethodNotAllowed,
    NotFound,
    SiteRecoveryError,
    Unauthorized,
)
from siterecovery.jobs.runtime import JobRuntime


class _ErrorResponse(JSONResponse):
    """An error document; ASCII-escaped, so that input echoed in a message (even a
    lone surrogate from a JSON escape) can always be encoded."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return _ErrorResponse(status_code=status, content=body)


def _document(status: int, error: SiteRecoveryError) -> JSONResponse:
    body = error.to_dict()
    return _error(status, body["code"], body["message"], body["details"])


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SiteRecoveryError)
    return _document(STATUS[exc.category], exc)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 becomes our ``INVALID_INPUT`` (400) naming the first bad field."""
    assert isinstance(exc, RequestValidationError)
    problems = [_problem(e) for e in exc.errors()] or [{"field": "body", "reason": "invalid"}]
    error = InvalidInput(**problems[0])
    return _error(400, error.code, error.message, {**problems[0], "errors": problems})


def _problem(error: Any) -> dict[str, str]:
    """``{"field", "reason"}`` of one pydantic error: ``dryrun``, ``query.timeout``…"""
    where = [str(p) for p in error.get("loc", ()) if p != "body"]
    field = ".".join(where) or "body"
    if error.get("type") == "extra_forbidden":
        return {"field": field, "reason": "unknown field (a typo?); it is not accepted"}
    reason = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return {"field": field, "reason": reason}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own refusals (no route, wrong method, no token) as our documents."""
    assert isinstance(exc, HTTPException)
    detail, path = str(exc.detail), request.url.path
    error: SiteRecoveryError
    if exc.status_code == 401:
        error = Unauthorized(reason=detail)
    elif exc.status_code == 404:
        error = NotFound(kind="route", name=path)
    elif exc.status_code == 405:
        error = MethodNotAllowed(method=request.method, path=path)
    elif exc.status_code < 500:
        error = InvalidInput(field="request", reason=detail)
    else:
        error = InternalError(detail=detail)
    return _document(exc.status_code, error)


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    """A bug or an untranslated foreign error: still the one JSON error shape."""
    return _error(500, "INTERNAL", f"{type(exc).__name__}: {exc}")


def create_app(ctx: Context, runtime: JobRuntime, *, token: str) -> FastAPI:
    app = FastAPI(
        title="siterecovery",
        version=__version__,
        description="Open, self-hosted site recovery for virtual machines.",
    )
    app.state.ctx = ctx
    app.state.runtime = runtime
    app.state.token = token
    app.add_exception_handler(SiteRecoveryError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    secured = [Depends(require_token)]
    app.include_router(inventory.router, prefix="/api/v1", dependencies=secured)
    app.include_router(protection.router, prefix="/api/v1", dependencies=secured)
    app.include_router(keys.router, prefix="/api/v1", dependencies=secured)
    app.include_router(failover.router, prefix="/api/v1", dependencies=secured)
    app.include_router(recovery.router, prefix="/api/v1", dependencies=secured)

    portal.install(app)  # the web UI at /, over the same services

    @app.get("/api/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    return app
