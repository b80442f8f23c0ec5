"""Dependencies shared by the routes: the service context, the job runtime, auth."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from siterecovery.jobs.runtime import JobRuntime
from siterecovery.services.context import Context


def get_ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def get_runtime(request: Request) -> JobRuntime:
    runtime: JobRuntime = request.app.state.runtime
    return runtime


def require_token(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Every API call carries ``Authorization: Bearer <vault token>``."""
    expected: str = request.app.state.token
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given, expected):
        raise HTTPException(status_code=401, detail="missing or wrong API token")


Ctx = Annotated[Context, Depends(get_ctx)]
Runtime = Annotated[JobRuntime, Depends(get_runtime)]
