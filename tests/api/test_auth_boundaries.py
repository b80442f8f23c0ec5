"""Every door is locked: each ``/api/v1`` route without the token answers 401,
each portal POST of a signed-in session without its CSRF token answers 403.

The routes are enumerated from the application itself, so a route added later
is checked without anyone listing it here; the requests go to a real daemon.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, cast

import fastapi.routing
import httpx
import pytest

from siterecovery.api.app import create_app

from ..conftest import Daemon
from ..portal.conftest import portal_url, signed_in_client

PUBLIC = {("GET", "/api/v1/health")}
"""The liveness probe is the one API route open to anyone (it says only the version)."""


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route of the daemon's application."""
    app = create_app(cast(Any, None), cast(Any, None), token="unused")  # routes only
    # FastAPI >= 0.165 keeps included routers lazily: flatten them as it does.
    flatten = getattr(fastapi.routing, "iter_route_contexts", list)
    found = {
        (method, str(route.path))
        for route in flatten(app.routes)
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
        and route.path not in ("/openapi.json", "/docs", "/redoc")
        and not str(route.path).startswith("/docs/")
    }
    return sorted(found)


ROUTES = _routes()
API = [r for r in ROUTES if r[1].startswith("/api/v1/") and r not in PUBLIC]
PORTAL_POSTS = [r for r in ROUTES if r[0] == "POST" and not r[1].startswith("/api/")]


def _filled(path: str) -> str:
    """A concrete URL for a route template (the lab's names, an unknown job)."""
    return re.sub(r"\{[^}]+\}", "web01", path)


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    running = Daemon(tmp_path_factory.mktemp("doors") / "vault").start()
    yield running
    running.stop()


def test_the_routes_are_enumerated() -> None:
    assert len(API) >= 50 and ("POST", "/api/v1/items/{vm}/failover") in API
    assert len(PORTAL_POSTS) >= 15 and ("POST", "/items/{vm}/failover") in PORTAL_POSTS
    assert ("POST", "/login") in PORTAL_POSTS


def test_every_api_route_needs_the_token(bare: Daemon) -> None:
    root = portal_url(bare)
    wrong: list[str] = []
    with httpx.Client(base_url=root, timeout=60.0) as anonymous:
        for method, path in API:
            for headers in ({}, {"Authorization": "Bearer not-the-token"}):
                answer = anonymous.request(method, _filled(path), json={}, headers=headers)
                code = answer.json().get("error", {}).get("code")
                if (answer.status_code, code) != (401, "UNAUTHORIZED"):
                    wrong.append(f"{method} {path} {headers}: {answer.status_code} {code}")
        assert anonymous.get("/api/v1/health").status_code == 200
    assert not wrong, "\n".join(wrong)


def test_every_portal_post_needs_its_csrf_token(bare: Daemon) -> None:
    client, csrf = signed_in_client(bare)
    wrong: list[str] = []
    for method, path in PORTAL_POSTS:
        for form in ({}, {"csrf_token": "0" * len(csrf)}):
            answer = client.request(method, _filled(path), data=form)
            if answer.status_code != 403 or "CSRF_REFUSED" not in answer.text:
                wrong.append(f"{method} {path} {form}: {answer.status_code}")
    # The session itself is fine: with the token, the same client is let through.
    assert client.post("/logout", data={"csrf_token": csrf}).status_code == 303
    client.close()
    assert not wrong, "\n".join(wrong)


def test_a_cookie_opens_no_api_route(bare: Daemon) -> None:
    client, _ = signed_in_client(bare)
    answer = client.get("/api/v1/items")
    client.close()
    assert answer.status_code == 401 and answer.json()["error"]["code"] == "UNAUTHORIZED"
