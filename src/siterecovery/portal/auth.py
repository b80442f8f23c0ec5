"""Routes: sign in with the vault's API token, sign out; the 401 and CSRF answers."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, Response

from siterecovery.portal import render
from siterecovery.portal.session import (
    CsrfRefused,
    Session,
    SignInRequired,
    clear_cookie,
    current,
    posted_with_csrf,
    require_csrf,
    sessions,
    set_cookie,
)

router = APIRouter()


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a path of this site only (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> Response:
    session = current(request)
    if session is not None and session.signed_in:
        return render.redirect(request, safe_next(next))
    session = session or sessions(request).new(signed_in=False)
    response = render.page(
        request, session, "login.html", {"next": safe_next(next), "wrong": False}
    )
    set_cookie(request, response, session)
    return response


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request, token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/"
) -> Response:
    session = current(request)
    if session is None:
        raise CsrfRefused()
    await require_csrf(request, session)
    if not sessions(request).token_matches(token):
        context = {"next": safe_next(next), "wrong": True}
        return render.page(request, session, "login.html", context, status=401)
    response = render.redirect(request, safe_next(next))
    set_cookie(request, response, sessions(request).new(signed_in=True))
    return response


@router.post("/logout")
def logout(request: Request, _: Annotated[Session, Depends(posted_with_csrf)]) -> Response:
    response = render.redirect(request, "/login")
    clear_cookie(response)
    return response


async def sign_in_required(request: Request, _exc: Exception) -> Response:
    """401 for any portal request without a signed-in session; a browser is sent on
    to /login (HX-Redirect for htmx, a meta refresh for a page)."""
    here = urlsplit(request.headers.get("HX-Current-URL") or str(request.url))
    back = here.path + (f"?{here.query}" if here.query else "")
    target = "/login?next=" + quote(safe_next(back), safe="/")
    response = render.page(request, None, "unauthorized.html", {"target": target}, status=401)
    if render.is_htmx(request):
        response.headers["HX-Redirect"] = target
    return response


async def csrf_refused(request: Request, _exc: Exception) -> Response:
    session = current(request)
    return render.error_page(
        request,
        session if session and session.signed_in else None,
        status=403,
        code="CSRF_REFUSED",
        message="the form's CSRF token is missing or wrong; reload the page and try again",
    )


HANDLERS = {SignInRequired: sign_in_required, CsrfRefused: csrf_refused}
