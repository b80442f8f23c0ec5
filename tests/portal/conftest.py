"""Fixtures of the portal tests: Debian's Chromium driven by Playwright.

Never `playwright install`: the browser is /usr/bin/chromium, kept from looking
up any outside host. Screenshots go to tests/portal/artifacts/ (not committed).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from ..conftest import Daemon

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@pytest.fixture(scope="session")
def browser_type_launch_args() -> dict[str, Any]:
    return {"executable_path": "/usr/bin/chromium", "args": CHROMIUM_ARGS, "headless": True}


@pytest.fixture(scope="session")
def browser_context_args() -> dict[str, Any]:
    """A laptop screen: the portal must not break at 1280×800."""
    return {"viewport": {"width": 1280, "height": 800}}


def portal_url(daemon: Daemon) -> str:
    assert daemon.client is not None
    return str(daemon.client.base_url).rstrip("/").removesuffix("/api/v1")


def token_of(daemon: Daemon) -> str:
    return (daemon.vault / "token").read_text().strip()


@pytest.fixture(scope="module")
def bare_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon without the lab (auth tests need no VM), shared by a module."""
    running = Daemon(tmp_path_factory.mktemp("portal") / "vault").start()
    yield running
    running.stop()


def signed_in_client(daemon: Daemon) -> tuple[httpx.Client, str]:
    """An HTTP client with a signed-in portal session, and its CSRF token."""
    client = httpx.Client(base_url=portal_url(daemon), timeout=60.0)
    form = client.get("/login")
    csrf = csrf_of(form.text)
    answer = client.post("/login", data={"csrf_token": csrf, "token": token_of(daemon)})
    assert answer.status_code == 303, answer.text
    return client, csrf_of(client.get("/").text)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
    assert found, html[:500]
    return found.group(1)


def shoot(page: Page, name: str) -> Path:
    """A full-page screenshot of what the user sees now, kept as an artifact;
    the page must fit the laptop screen's width (no horizontal scrolling)."""
    widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"{name}: the page is {widths[0]} px wide in {widths[1]}"
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Page, daemon: Daemon, start: str = "/") -> None:
    """Open a page without a session: the portal sends the browser to sign in."""
    page.goto(portal_url(daemon) + start)
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API token").fill(token_of(daemon))
    page.get_by_role("button", name="Sign in").click()
