"""The job page's buttons: Resume a plan paused on a manual action, Cancel one."""

from __future__ import annotations

from playwright.sync_api import Dialog, Page, expect

from ..conftest import Daemon
from ..failover.support import job, protect
from .conftest import portal_url, shoot, sign_in
from .test_failback_story import job_ends


def paused_plan(daemon: Daemon) -> str:
    """A drill of plan ``tiers`` waiting for its manual action; the job id."""
    answer = daemon.call("POST", "/plans/tiers/failover", json={"type": "test"})
    return str(job(daemon, answer, state="awaiting-action")["id"])


def test_resume_and_cancel_a_paused_plan(daemon: Daemon, page: Page) -> None:
    protect(daemon, "web01")
    daemon.call("POST", "/plans", json={"name": "tiers"})
    daemon.call("POST", "/plans/tiers/vms", json={"group": 1, "vms": ["web01"]})
    action = {"group": 1, "name": "check-dns", "kind": "manual", "when": "before",
              "instructions": "point web.example at the recovery site"}  # fmt: skip
    daemon.call("POST", "/plans/tiers/actions", json=action)
    sign_in(page, daemon)

    page.goto(portal_url(daemon) + f"/jobs/{paused_plan(daemon)}")
    expect(page.locator("#job-live .big")).to_have_text("awaiting-action")
    expect(page.locator("#waiting-for")).to_contain_text("point web.example at the recovery site")
    shoot(page, "job-awaiting-action")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#job-live .big")).not_to_have_text("awaiting-action")
    job_ends(page)
    job(daemon, daemon.call("POST", "/plans/tiers/cleanup-test"))

    page.goto(portal_url(daemon) + f"/jobs/{paused_plan(daemon)}")
    page.once("dialog", lambda dialog: accept(dialog, "Cancel this job?"))
    page.get_by_role("button", name="Cancel job").click()
    job_ends(page, "cancelled")
    expect(page.get_by_role("button", name="Resume")).to_have_count(0)


def accept(dialog: Dialog, expected: str) -> None:
    assert dialog.message.startswith(expected), dialog.message
    dialog.accept()
