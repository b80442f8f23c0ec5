"""The failback dialog offers only what works: no encryption-key choice while
an item's replicas are not encrypted (the service refuses any key for them)."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from ..conftest import Daemon
from .conftest import shoot, sign_in


def _done(daemon: Daemon, answer: dict[str, str]) -> None:
    assert daemon.wait_job(answer["job"])["state"] == "succeeded"


def test_failback_dialog_lists_no_vault_key(daemon: Daemon, page: Page) -> None:
    daemon.call("POST", "/keys", json={"name": "offsite-k1"})
    _done(
        daemon, daemon.call("POST", "/items", json={"vm": "web01", "to": "cloud", "interval": "1h"})
    )
    _done(daemon, daemon.call("POST", "/items/web01/failover", json={"type": "unplanned"}))
    _done(daemon, daemon.call("POST", "/items/web01/commit", json={}))

    sign_in(page, daemon, "/items/web01/failover?type=planned")
    expect(page.get_by_role("heading", name="Failback: web01")).to_be_visible()
    expect(page.get_by_label("Threads")).to_be_visible()  # the Transfer choices are there
    expect(page.get_by_label("Encryption key")).to_have_count(0)
    expect(page.locator("main")).not_to_contain_text("offsite-k1")
    shoot(page, "failback-dialog-no-key")
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#preview .plan")).to_contain_text("Every precondition passes")
