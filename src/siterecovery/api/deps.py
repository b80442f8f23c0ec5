"""Dependencies shared by the routes: the service context, the job runtime, auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from siterecovery.context import Context
from siterecovery.jobs.runtime import JobRuntime


def get_ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def get_runtime(request: Request) -> JobRuntime:
    runtime: JobRuntime = request.app.state.runtime
    return runtime


_BEARER = HTTPBearer(auto_error=False, description="The vault's API token (`VAULT/token`).")
"""Declares the scheme in the OpenAPI document (clients and fuzzers see it); we refuse."""


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> None:
    """Every API call carries ``Authorization: Bearer <vault token>``."""
    expected: str = request.app.state.token
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status_code=401, detail="missing or wrong API token")


Ctx = Annotated[Context, Depends(get_ctx)]
Runtime = Annotated[JobRuntime, Depends(get_runtime)]
