"""Replicated items: a drill on a chosen point by clicking, a page that refreshes
itself, an action menu reached by keyboard, and a protection refused in the page."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from ..conftest import Daemon
from ..failover.support import job, protect
from .conftest import portal_url, shoot, sign_in
from .test_failback_story import choose, job_ends, row


def test_drill_on_a_chosen_point_and_a_live_table(daemon: Daemon, page: Page) -> None:
    protect(daemon, "db01")  # set-up through the API: the story test clicks it
    daemon.call("POST", "/items/db01/replicate", json={"app_consistent": True})
    points = daemon.call("GET", "/items/db01/points")
    first = points[0]["id"]
    sign_in(page, daemon, "/items")
    page.wait_for_url(re.compile(r"/items$"))
    expect(row(page, "db01").locator("td.state")).to_have_text("protected")

    # Keyboard: the row's menu opens with Enter and its entries are next in the tab order.
    page.evaluate("window.notReloaded = true")
    row(page, "db01").locator("summary").focus()
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.textContent.trim()")
    assert focused == "Test failover"
    # The table refreshes every 2 s, but not under an open menu.
    page.evaluate("window.openMenu = document.querySelector('#items-live details[open]')")
    page.wait_for_timeout(2500)
    assert page.evaluate("document.querySelector('#items-live details[open]') === window.openMenu")
    shoot(page, "items-menu")
    page.keyboard.press("Enter")

    # The drill dialog: a point of the list, previewed, then started.
    expect(page.get_by_role("heading", name="Test failover: db01")).to_be_visible()
    page.get_by_label("This point:").check()
    page.get_by_label("Recovery point to use").select_option(first)
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#preview .plan")).to_contain_text(first)
    page.get_by_label("I confirm the direction").check()
    page.get_by_role("button", name="Start test failover").click()
    job_ends(page)
    expect(page.locator("#job-live")).to_contain_text("start-test-vm")

    # The drill is cleaned up from the item's menu, which now offers it.
    page.goto(portal_url(daemon) + "/items")
    choose(page, "db01", "Clean up test failover")
    job_ends(page)

    # The table follows changes made elsewhere (here the API) without a reload.
    page.goto(portal_url(daemon) + "/items")
    page.evaluate("window.notReloaded = true")
    job(daemon, daemon.call("POST", "/items", json={"vm": "web01", "to": "cloud"}))
    expect(row(page, "web01").locator("td.state")).to_have_text("protected", timeout=15_000)
    assert page.evaluate("window.notReloaded") is True


def test_a_refused_protection_shows_its_code_and_changes_nothing(
    daemon: Daemon, page: Page
) -> None:
    sign_in(page, daemon, "/items")
    page.wait_for_url(re.compile(r"/items$"))
    jobs_before = daemon.call("GET", "/jobs")
    page.get_by_label("VM", exact=True).select_option("web01")
    page.get_by_label("Replicate to site").select_option("onprem")  # where it runs
    page.get_by_role("button", name="Enable replication").click()
    flash = page.locator("#flash .error")
    expect(flash.locator(".code")).to_have_text("SAME_SITE")
    expect(flash.locator(".message")).to_contain_text("web01")
    assert page.url.endswith("/items")
    assert daemon.call("GET", "/items") == [] and daemon.call("GET", "/jobs") == jobs_before
    page.get_by_label("Replication interval").fill("soon")
    page.get_by_label("Replicate to site").select_option("cloud")
    page.get_by_role("button", name="Enable replication").click()
    expect(flash.locator(".code")).to_have_text("INVALID_INPUT")
    expect(flash.locator(".message")).to_contain_text("interval")
    assert daemon.call("GET", "/items") == []
