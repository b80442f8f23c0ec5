"""The FastAPI application: routes per resource, one error mapping, token auth.

Only this layer knows HTTP statuses: they follow the error category.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from siterecovery import __version__, portal
from siterecovery.api import failover, inventory, keys, protection, recovery
from siterecovery.api.deps import require_token
from siterecovery.domain.errors import Category, SiteRecoveryError
from siterecovery.jobs.runtime import JobRuntime
from siterecovery.services.context import Context

STATUS = {
    Category.USAGE: 400,
    Category.NOT_FOUND: 404,
    Category.RULE: 409,
    Category.CONFLICT: 409,
    Category.CANCELLED: 409,
    Category.IO: 502,
    Category.INTERNAL: 500,
}


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details or {}}}
    return JSONResponse(status_code=status, content=body)


async def _domain_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SiteRecoveryError)
    body = exc.to_dict()
    return _error(STATUS[exc.category], body["code"], body["message"], body["details"])


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid"}
    field = ".".join(str(p) for p in first["loc"] if p != "body")
    return _error(400, "INVALID_INPUT", f"{field}: {first['msg']}", {"errors": str(exc.errors())})


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = {401: "UNAUTHORIZED", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(
        exc.status_code, "HTTP_ERROR"
    )
    return _error(exc.status_code, code, str(exc.detail))


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
