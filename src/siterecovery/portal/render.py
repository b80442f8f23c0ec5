"""Rendering: the Jinja2 environment, pages and partials, redirects and errors.

A page template ``NAME.html`` includes its live part ``_NAME.html``; a request
with ``?part=1`` (an htmx poll) gets the part alone. Answers to htmx requests
redirect with ``HX-Redirect`` and put errors into the page's ``#flash`` box
(``HX-Retarget``); plain form posts get a 303 or a whole error page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from siterecovery import __version__
from siterecovery.api.status import STATUS
from siterecovery.domain.errors import SiteRecoveryError
from siterecovery.portal import views
from siterecovery.portal.session import CSRF_FIELD, CSRF_HEADER, Session

HERE = Path(__file__).parent
STATIC = HERE / "static"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        bytes=views.human_bytes,
        seconds=views.human_seconds,
        rate=views.human_rate,
        time=views.human_time,
    )
    env.globals.update(
        version=__version__,
        csrf_field=CSRF_FIELD,
        csrf_header=CSRF_HEADER,
        brief=views.brief,
        health_words=views.HEALTH_WORDS,
    )
    return env


TEMPLATES = Jinja2Templates(env=_environment())


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def page(
    request: Request,
    session: Session | None,
    name: str,
    context: dict[str, Any],
    *,
    part: bool = False,
    status: int = 200,
) -> HTMLResponse:
    """The page ``name`` (or its live part) with the session's CSRF token."""
    template = f"_{name}" if part else name
    full = {"session": session, "csrf": session.csrf if session else "", **context}
    return TEMPLATES.TemplateResponse(request, template, full, status_code=status)


def redirect(request: Request, to: str) -> Response:
    """After a successful POST: htmx follows ``HX-Redirect``, a browser a 303."""
    if is_htmx(request):
        return Response(status_code=200, headers={"HX-Redirect": to})
    return RedirectResponse(to, status_code=303)


def error_page(
    request: Request,
    session: Session | None,
    *,
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> HTMLResponse:
    """An error where the user clicked: the ``#flash`` box, or a whole page."""
    context = {"code": code, "message": message, "details": details or {}}
    if is_htmx(request):
        response = page(request, session, "error.html", context, part=True, status=status)
        response.headers.update({"HX-Retarget": "#flash", "HX-Reswap": "innerHTML show:top"})
        return response
    return page(request, session, "error.html", context, status=status)


def refused(request: Request, session: Session, error: SiteRecoveryError) -> HTMLResponse:
    """A SiteRecoveryError from a service: its code and message, nothing done."""
    body = error.to_dict()
    return error_page(
        request,
        session,
        status=http_status(error),
        code=body["code"],
        message=body["message"],
        details=body["details"],
    )


def http_status(error: SiteRecoveryError) -> int:
    """The API's status for ``error``: one mapping, api/status.py's ``STATUS``."""

    return STATUS[error.category]
