"""The Hyper-V failback story of the seed, only by clicking in the portal.

Log in; enable replication of web01; unplanned failover; commit; a planned
failover back (a failback) refused while the on-premises host is down; the
failback with "synchronize before failover"; the job waits in
*awaiting-completion*; **Complete failover**; commit; **Reverse replicate**;
web01 protected again. After every step the test reads the page (state text,
job state); the API is read only to prove that a refusal changed nothing.

One test, stopping at its first failure, like a runbook.
"""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Locator, Page, expect

from ..conftest import Daemon, vault_snapshot
from .conftest import shoot, sign_in

JOB_WAIT = 180_000  # ms: a loaded machine may be slow; never asserted as a time
FINAL = re.compile(r"^(succeeded|failed|cancelled|awaiting-completion)$")


def row(page: Page, vm: str) -> Locator:
    return page.locator(f'#items-live tr[data-vm="{vm}"]')


def open_items(page: Page) -> None:
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Replicated items").click()
    expect(page.get_by_role("heading", name="Replicated items", exact=True)).to_be_visible()


def choose(page: Page, vm: str, action: str) -> None:
    """Open the row's action menu and click one of the operations it offers."""
    row(page, vm).locator("summary").click()
    name = f"{action} {vm}"
    entry = row(page, vm).get_by_role("link", name=name, exact=True)
    entry.or_(row(page, vm).get_by_role("button", name=name, exact=True)).click()


def job_ends(page: Page, state: str = "succeeded") -> None:
    """On a job page: wait for the job to stop or pause; it must be in ``state``."""
    page.wait_for_url(re.compile(r"/jobs/j\w+$"))
    shown = page.locator("#job-live .big")
    expect(shown).to_have_text(FINAL, timeout=JOB_WAIT)
    assert shown.inner_text() == state, page.locator("#job-live").inner_text()


def item_is(page: Page, vm: str, state: str, direction: str) -> None:
    open_items(page)
    expect(row(page, vm).locator("td.state .badge")).to_have_text(state)
    expect(row(page, vm).locator("td.direction")).to_have_text(direction)


def test_hyperv_failback_story_by_clicking(daemon: Daemon, vault: Path, page: Page) -> None:
    # Log in: a page without a session sends the browser to sign in, then back.
    sign_in(page, daemon, "/items")
    page.wait_for_url(re.compile(r"/items$"))

    # Enable replication of web01 toward the cloud site.
    page.get_by_label("VM", exact=True).select_option("web01")
    page.get_by_label("Replicate to site").select_option("cloud")
    page.get_by_label("Replication interval").fill("1h")
    page.get_by_role("button", name="Enable replication").click()
    job_ends(page)
    expect(page.locator('#job-live tr[data-step="initial-sync"]')).to_contain_text("succeeded")
    item_is(page, "web01", "protected", "onprem → cloud")
    expect(row(page, "web01").locator("td.health")).to_have_text("healthy")
    shoot(page, "items-protected")

    # Unplanned failover to the latest point; the dialog shows the direction.
    choose(page, "web01", "Failover")
    expect(page.locator("#source-site")).to_have_text("onprem")
    expect(page.locator("#target-site")).to_have_text("cloud")
    page.get_by_label("Latest (the most recent point)").check()
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#preview .plan")).to_contain_text("Every precondition passes")
    page.get_by_label("I confirm the direction").check()
    page.get_by_role("button", name="Start failover").click()
    job_ends(page)
    item_is(page, "web01", "failed-over", "cloud → onprem")

    # Commit (Valider).
    choose(page, "web01", "Commit")
    job_ends(page)
    item_is(page, "web01", "committed", "cloud → onprem")

    # The on-premises host is down: the failback is refused, and nothing changes.
    daemon.call("PATCH", "/hosts/hv01", json={"connected": False})
    before = vault_snapshot(daemon, vault)
    choose(page, "web01", "Planned failover")
    expect(page.get_by_role("heading", name="Failback: web01")).to_be_visible()
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#preview .plan")).to_contain_text("HOST_DISCONNECTED")
    page.get_by_label("I confirm the direction").check()
    page.get_by_role("button", name="Start failback").click()
    flash = page.locator("#flash .error")
    expect(flash.locator(".code")).to_have_text("HOST_DISCONNECTED")
    expect(flash.locator(".message")).to_contain_text("host 'hv01' is not connected")
    shoot(page, "failback-refused")
    assert page.url.endswith("/items/web01/failover?type=planned")  # still in the dialog
    assert vault_snapshot(daemon, vault) == before
    item_is(page, "web01", "committed", "cloud → onprem")
    daemon.call("PATCH", "/hosts/hv01", json={"connected": True})

    # Planned failover back, synchronizing before failover (delta, two phases).
    choose(page, "web01", "Planned failover")
    expect(page.locator("#source-site")).to_have_text("cloud")
    expect(page.locator("#target-site")).to_have_text("onprem")
    delta = page.get_by_label("Synchronize data before failover (synchronize delta changes only)")
    expect(delta).to_be_checked()
    expect(page.locator("#sync-delta-help")).to_contain_text("Phase 1")
    expect(page.locator("#sync-full-help")).to_contain_text("no checksum")
    page.get_by_label("Original location").check()
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#preview .plan")).to_contain_text("Every precondition passes")
    expect(page.locator("#preview .plan")).to_contain_text("tracked")
    shoot(page, "failback-dialog")
    page.get_by_label("I confirm the direction").check()
    page.get_by_role("button", name="Start failback").click()

    # Phase 1 runs, then the job waits for the user in the Jobs page.
    job_ends(page, "awaiting-completion")
    expect(page.locator("#awaiting")).to_contain_text("Complete failover")
    expect(page.locator('#job-live tr[data-step="phase1-sync"]')).to_contain_text("succeeded")
    shoot(page, "job-awaiting-completion")
    job_page = page.url
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    failback_row = page.locator('#jobs-live tr[data-kind="failback"]').first
    expect(failback_row.locator("td.state")).to_have_text("awaiting-completion")
    item_is(page, "web01", "awaiting-completion", "cloud → onprem")

    # Complete failover: stop at the cloud, last changes, start on-premises.
    page.goto(job_page)
    page.get_by_role("button", name="Complete failover").click()
    expect(page.locator("#job-live .big")).not_to_have_text("awaiting-completion")
    job_ends(page)
    expect(page.locator("#integrity")).to_contain_text("digests equal")
    expect(page.locator("#downtime")).to_have_text(re.compile(r"^\d"))  # measured seconds
    expect(page.locator(".phase2")).to_contain_text("Predicted")
    shoot(page, "job-failback-done")
    item_is(page, "web01", "failed-over", "onprem → cloud")

    # Commit, then reverse replicate (Réplication inverse).
    choose(page, "web01", "Commit")
    job_ends(page)
    item_is(page, "web01", "committed", "onprem → cloud")
    choose(page, "web01", "Reverse replicate")
    job_ends(page)
    expect(page.locator('#job-live tr[data-step="initial-sync"]')).to_contain_text("checksum")
    item_is(page, "web01", "protected", "onprem → cloud")
    expect(row(page, "web01").locator("td.health")).to_have_text("healthy")

    # The item's page: its recovery points on a timeline; the overview.
    row(page, "web01").get_by_role("link", name="web01").click()
    expect(page.locator("#item-state")).to_have_text("protected")
    expect(page.locator(".timeline .tick").first).to_be_visible()
    shoot(page, "item-points")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Overview").click()
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    shoot(page, "overview")
    assert daemon.call("GET", "/items/web01")["state"] == "protected"
