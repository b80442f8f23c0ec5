"""Nothing of the portal without the vault token; no form without its CSRF token.

Plain HTTP against a real daemon (no lab needed), and one sign-in in Chromium.
"""

from __future__ import annotations

import re
from contextlib import closing

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer
from playwright.sync_api import Page, expect

from ..conftest import Daemon
from .conftest import csrf_of, portal_url, signed_in_client, token_of

PAGES = ["/", "/items", "/items?part=1", "/items/web01", "/items/web01/failover", "/jobs",
         "/jobs/j0123456789ab", "/plans", "/plans?part=1", "/plans/tiers",
         "/plans/tiers/operations/test-failover"]  # fmt: skip
POSTS = ["/items", "/items/web01/commit", "/items/web01/reprotect", "/items/web01/disable",
         "/items/web01/failover", "/items/web01/failover/preview", "/jobs/j0123456789ab/complete",
         "/jobs/j0123456789ab/cancel", "/logout", "/plans", "/plans/tiers/vms",
         "/plans/tiers/vms/web01/remove", "/plans/tiers/actions",
         "/plans/tiers/operations/test-failover", "/plans/tiers/operations/test-failover/preview",
         "/groups", "/groups/app/point"]  # fmt: skip


@pytest.mark.parametrize("path", PAGES)
def test_pages_without_a_session_are_401(bare_daemon: Daemon, path: str) -> None:
    answer = httpx.get(portal_url(bare_daemon) + path)
    assert answer.status_code == 401
    assert "UNAUTHORIZED" in answer.text and "/login?next=" in answer.text
    assert "sr_portal" not in answer.headers.get("set-cookie", "")


@pytest.mark.parametrize("path", POSTS)
def test_posts_without_a_session_are_401(bare_daemon: Daemon, path: str) -> None:
    answer = httpx.post(portal_url(bare_daemon) + path, data={"vm": "web01", "to": "cloud"})
    assert answer.status_code == 401


@pytest.mark.parametrize("path", POSTS)
def test_posts_without_csrf_are_403(bare_daemon: Daemon, path: str) -> None:
    client, _ = signed_in_client(bare_daemon)
    with closing(client):
        answer = client.post(path, data={"vm": "web01", "to": "cloud", "name": "tiers"})
        assert answer.status_code == 403 and "CSRF_REFUSED" in answer.text
        assert client.get("/").status_code == 200  # still signed in: only the POST is refused


def test_htmx_poll_without_a_session_is_sent_to_login(bare_daemon: Daemon) -> None:
    headers = {"HX-Request": "true", "HX-Current-URL": portal_url(bare_daemon) + "/jobs"}
    answer = httpx.get(portal_url(bare_daemon) + "/jobs?part=1", headers=headers)
    assert answer.status_code == 401
    assert answer.headers["HX-Redirect"] == "/login?next=/jobs"


def test_forged_or_foreign_cookies_are_401(bare_daemon: Daemon) -> None:
    url = portal_url(bare_daemon) + "/items"
    # Signed with another secret (another vault's token): refused.
    foreign = URLSafeTimedSerializer("another-secret", salt="portal-session").dumps(["x", True])
    assert httpx.get(url, cookies={"sr_portal": foreign}).status_code == 401
    # A real anonymous session (from the login page) does not open the portal.
    with httpx.Client(base_url=portal_url(bare_daemon)) as client:
        client.get("/login")
        assert client.get("/items").status_code == 401
    # Nor does the raw API token put in the cookie.
    token = token_of(bare_daemon)
    assert httpx.get(url, cookies={"sr_portal": token}).status_code == 401


def test_a_wrong_token_does_not_sign_in(bare_daemon: Daemon) -> None:
    with httpx.Client(base_url=portal_url(bare_daemon)) as client:
        csrf = csrf_of(client.get("/login").text)
        answer = client.post("/login", data={"csrf_token": csrf, "token": "not-the-token"})
        assert answer.status_code == 401 and "the token is wrong" in answer.text
        assert client.get("/").status_code == 401


def test_the_session_cookie_is_signed_httponly_strict_and_holds_no_token(
    bare_daemon: Daemon,
) -> None:
    with httpx.Client(base_url=portal_url(bare_daemon)) as client:
        csrf = csrf_of(client.get("/login").text)
        answer = client.post("/login", data={"csrf_token": csrf, "token": token_of(bare_daemon)})
        assert answer.status_code == 303
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert token_of(bare_daemon) not in cookie
        assert client.get("/").status_code == 200
        # The JSON API keeps its bearer token: a portal session is not enough.
        api = client.get("/api/v1/items")
        assert api.status_code == 401 and api.json()["error"]["code"] == "UNAUTHORIZED"


def test_login_without_csrf_is_refused(bare_daemon: Daemon) -> None:
    with httpx.Client(base_url=portal_url(bare_daemon)) as client:
        client.get("/login")
        answer = client.post("/login", data={"token": token_of(bare_daemon)})
        assert answer.status_code == 403 and "CSRF_REFUSED" in answer.text
        assert client.get("/").status_code == 401  # not signed in


def test_a_form_without_its_csrf_token_is_refused(bare_daemon: Daemon) -> None:
    client, csrf = signed_in_client(bare_daemon)
    with closing(client):
        # Sign-out is a form: without the token (or with another) it does nothing.
        for data in ({}, {"csrf_token": "0" * 64}):
            answer = client.post("/logout", data=data)
            assert answer.status_code == 403 and "CSRF_REFUSED" in answer.text
            assert client.get("/").status_code == 200  # still signed in
        # An action without the token is refused before the service is asked:
        # the answer is the CSRF refusal, not the service's ITEM_NOT_FOUND.
        refused = client.post("/items/web01/commit", data={})
        assert refused.status_code == 403 and "CSRF_REFUSED" in refused.text
        asked = client.post("/items/web01/commit", data={"csrf_token": csrf})
        assert asked.status_code == 404 and "ITEM_NOT_FOUND" in asked.text
        # htmx sends the token as a header.
        headers = {"X-CSRF-Token": csrf, "HX-Request": "true"}
        answer = client.post("/logout", headers=headers)
        assert answer.status_code == 200 and answer.headers["HX-Redirect"] == "/login"
        assert client.get("/").status_code == 401  # signed out


def test_sign_in_in_the_browser_returns_to_the_page(bare_daemon: Daemon, page: Page) -> None:
    page.goto(portal_url(bare_daemon) + "/jobs")
    expect(page).to_have_url(re.compile(r"/login\?next=/jobs$"))
    page.get_by_label("API token").fill("wrong")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert").filter(has_text="UNAUTHORIZED")).to_be_visible()
    page.get_by_label("API token").fill(token_of(bare_daemon))
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/jobs$"))
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.goto(portal_url(bare_daemon) + "/jobs")
    expect(page).to_have_url(re.compile(r"/login\?next=/jobs$"))
