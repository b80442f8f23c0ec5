"""Recovery plans and replication groups in the portal, by clicking.

A plan made in the page (two boot groups, a manual action between them), its
test failover previewed and run to the parent job page, paused on the manual
action, resumed, its VM jobs listed, then cleaned up; refusals that show their
code and change nothing; a replication group made and given a common point,
which a plan's latest app-consistent failover then uses, and the plan's
failback dialog with its data-sync choice. Protection (and, where the plan
itself is not under test, the plan and its failover) is set up through the API.
"""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Locator, Page, expect

from ..conftest import Daemon, vault_snapshot
from ..failover.support import job, protect
from .conftest import portal_url, shoot, sign_in
from .test_failback_story import JOB_WAIT, job_ends
from .test_job_page import accept

PAUSED_OR_FINAL = re.compile(r"^(awaiting-action|succeeded|failed|cancelled)$")


def boot_group(page: Page, index: int) -> Locator:
    return page.locator(f'#plan-live .boot-group[data-group="{index}"]')


def preview_row(page: Page, index: int, vm: str) -> Locator:
    return page.locator(f'#preview .boot-group[data-group="{index}"] tr[data-vm="{vm}"]')


def child(page: Page, vm: str) -> Locator:
    return page.locator(f'#job-live table.children tr[data-vm="{vm}"]')


def add_vm(page: Page, vm: str, group: int) -> None:
    page.get_by_label("VM", exact=True).select_option(vm)
    page.get_by_label("Boot group", exact=True).fill(str(group))
    page.get_by_role("button", name="Add VM").click()
    expect(boot_group(page, group).locator(f'tr[data-vm="{vm}"]')).to_be_visible()


def operation(page: Page, label: str) -> None:
    """From a plan's page, open the dialog of one of the operations it offers."""
    page.locator("#plan-live").get_by_role("link", name=label, exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(label)


def latest_point(daemon: Daemon, vm: str) -> str:
    return str(daemon.call("GET", f"/items/{vm}")["latest_point"]["id"])


def test_a_plan_made_by_clicking_drills_through_its_manual_action(
    daemon: Daemon, page: Page
) -> None:
    protect(daemon, "web01")  # set-up through the API: the story test clicks it
    protect(daemon, "db01")
    points = {vm: latest_point(daemon, vm) for vm in ("web01", "db01")}
    sign_in(page, daemon, "/plans")
    page.wait_for_url(re.compile(r"/plans$"))

    # Create the plan; web01 boots first, db01 second, a manual step between.
    page.get_by_label("Plan name").fill("tiers")
    page.get_by_label("Description").fill("the web tier, then its database")
    page.get_by_role("button", name="Create plan").click()
    page.wait_for_url(re.compile(r"/plans/tiers$"))
    expect(page.get_by_role("heading", name="Recovery plan tiers")).to_be_visible()
    add_vm(page, "web01", 1)
    add_vm(page, "db01", 2)
    page.get_by_label("Action name").fill("check-db")
    page.get_by_label("When", exact=True).select_option("before")
    page.get_by_label("Of boot group").fill("2")
    page.get_by_label("Manual", exact=True).check()
    page.get_by_label("Manual instructions").fill("point db.example at the recovery site")
    page.get_by_role("button", name="Add action").click()
    expect(boot_group(page, 2).locator(".plan-actions.before")).to_contain_text("db.example")
    expect(boot_group(page, 1).locator('tr[data-vm="web01"] td.state')).to_have_text("protected")
    expect(boot_group(page, 2).locator('tr[data-vm="db01"] td.point')).to_have_text(points["db01"])

    # Preview the test failover: both VMs, in boot order, each with its point.
    operation(page, "Test failover")
    expect(page.locator("#point-help")).to_contain_text("latest common app-consistent point")
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#plan-preview")).to_contain_text("Every precondition passes")
    groups = page.locator("#preview .boot-group")
    expect(groups).to_have_count(2)
    assert [g.get_attribute("data-group") for g in groups.all()] == ["1", "2"]
    for index, vm in ((1, "web01"), (2, "db01")):
        expect(preview_row(page, index, vm).locator("td.point")).to_contain_text(points[vm])
        expect(preview_row(page, index, vm)).to_contain_text("test-failover")
    expect(groups.nth(1).locator(".plan-actions.before")).to_contain_text("check-db")
    shoot(page, "plan-preview")

    # Run it: group 1 drills, then the parent waits for the manual action.
    page.get_by_label("I confirm").check()
    page.get_by_role("button", name="Start test failover").click()
    page.wait_for_url(re.compile(r"/jobs/j\w+$"))
    parent = page.url
    shown = page.locator("#job-live .big")
    expect(shown).to_have_text(PAUSED_OR_FINAL, timeout=JOB_WAIT)
    assert shown.inner_text() == "awaiting-action", page.locator("#job-live").inner_text()
    expect(page.locator("#waiting-for")).to_contain_text("point db.example at the recovery site")
    expect(child(page, "web01").locator("td.state")).to_have_text("succeeded")
    expect(child(page, "db01").locator("td.state")).to_have_text("not started")
    shoot(page, "plan-job-awaiting-action")
    page.get_by_role("button", name="Resume").click()
    job_ends(page)
    for vm in ("web01", "db01"):
        expect(child(page, vm).locator("td.state")).to_have_text("succeeded")
        expect(child(page, vm)).to_contain_text("test-failover")
    child(page, "db01").get_by_role("link", name=re.compile(r"^j")).click()
    expect(page.locator("#job-live")).to_contain_text("start-test-vm")
    page.go_back()
    assert page.url == parent

    # The plan's page lists the job and now offers the cleanup.
    page.get_by_role("heading", level=1).get_by_role("link", name="tiers").click()
    page.wait_for_url(re.compile(r"/plans/tiers$"))
    expect(page.locator("#plan-live table.jobs")).to_contain_text("plan-test-failover")
    shoot(page, "plan-page")
    operation(page, "Clean up test failover")
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#plan-preview")).to_contain_text("Every precondition passes")
    page.get_by_label("I confirm").check()
    page.get_by_role("button", name="Start clean up test failover").click()
    job_ends(page)
    for vm in ("web01", "db01"):
        expect(child(page, vm).locator("td.state")).to_have_text("succeeded")
    assert daemon.call("GET", "/items/db01")["drill"] is None

    # The list of plans.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Recovery plans").click()
    expect(page.locator('#plans-live tr[data-plan="tiers"]')).to_contain_text("web01, db01")
    shoot(page, "plans")


def test_a_refused_plan_operation_shows_its_code_and_changes_nothing(
    daemon: Daemon, vault: Path, page: Page
) -> None:
    protect(daemon, "web01")  # db01 is never protected: it has no recovery point
    daemon.call("POST", "/plans", json={"name": "both"})
    daemon.call("POST", "/plans/both/vms", json={"group": 1, "vms": ["web01"]})
    daemon.call("POST", "/plans/both/vms", json={"group": 2, "vms": ["db01"]})
    sign_in(page, daemon, "/plans/both")
    expect(boot_group(page, 2).locator('tr[data-vm="db01"] td.state')).to_have_text("not protected")
    # The page follows changes made elsewhere (here the API) without a reload.
    page.evaluate("window.notReloaded = true")
    script = {
        "group": 1,
        "name": "warm-cache",
        "kind": "script",
        "when": "after",
        "command": "true",
    }
    daemon.call("POST", "/plans/both/actions", json=script)
    expect(boot_group(page, 1).locator(".plan-actions.after")).to_contain_text(
        "warm-cache", timeout=15_000
    )
    assert page.evaluate("window.notReloaded") is True
    before = vault_snapshot(daemon, vault)

    # The preview names the VM without a point; starting is refused the same way.
    operation(page, "Test failover")
    page.get_by_role("button", name="Preview").click()
    checks = page.locator("#plan-preview .plan-checks")
    expect(checks).to_contain_text("PLAN_VMS_WITHOUT_POINTS")
    expect(checks).to_contain_text("db01 has no recovery point")
    page.get_by_label("I confirm").check()
    page.get_by_role("button", name="Start test failover").click()
    flash = page.locator("#flash .error")
    expect(flash.locator(".code")).to_have_text("PLAN_VMS_WITHOUT_POINTS")
    expect(flash.locator(".message")).to_contain_text("db01 has no recovery point")
    assert page.url.endswith("/plans/both/operations/test-failover")  # still in the dialog
    shoot(page, "plan-refused")
    assert vault_snapshot(daemon, vault) == before

    # A definition the service refuses: a script action without its command.
    page.goto(portal_url(daemon) + "/plans/both")
    page.get_by_label("Action name").fill("notify")
    page.get_by_role("button", name="Add action").click()
    expect(flash.locator(".code")).to_have_text("INVALID_INPUT")
    expect(flash.locator(".message")).to_contain_text("command")
    assert vault_snapshot(daemon, vault) == before

    # Without db01 the plan can fail over.
    page.once("dialog", lambda dialog: accept(dialog, "Remove db01 from plan both?"))
    page.get_by_role("button", name="Remove db01").click()
    expect(boot_group(page, 1).locator('tr[data-vm="web01"]')).to_be_visible()
    expect(page.locator('#plan-live tr[data-vm="db01"]')).to_have_count(0)
    operation(page, "Test failover")
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#plan-preview")).to_contain_text("Every precondition passes")
    assert daemon.call("GET", "/plans/both")["vms"] == ["web01"]


def test_a_replication_group_made_by_clicking_fails_over_and_back_as_one(
    daemon: Daemon, vault: Path, page: Page
) -> None:
    protect(daemon, "web01")
    protect(daemon, "db01")
    sign_in(page, daemon, "/plans")
    page.wait_for_url(re.compile(r"/plans$"))

    # Create the group; take a common point now.
    page.get_by_label("Group name").fill("app")
    page.get_by_label("web01").check()
    page.get_by_label("db01").check()
    page.get_by_label("Common point every").fill("0")
    page.get_by_role("button", name="Create group").click()
    row = page.locator('#plans-live tr[data-group="app"]')
    expect(row).to_contain_text(re.compile(r"(web01, db01|db01, web01) \(2/16\)"))
    expect(row.locator("td.common-app")).to_have_text("\N{EN DASH}")
    expect(page.locator("#create-group")).to_contain_text("No protected VM outside a group")
    row.get_by_role("button", name="Take common point now").click()
    expect(row.locator("td.common-app")).to_contain_text("app-c000001")
    shoot(page, "replication-groups")
    common = daemon.call("GET", "/groups/app")["latest_common_app_consistent"]["points"]

    # A plan of the whole group fails over on the group's common point.
    daemon.call("POST", "/plans", json={"name": "app"})  # plan set-up: the first test clicks it
    daemon.call("POST", "/plans/app/vms", json={"group": 1, "vms": ["web01", "db01"]})
    daemon.call("POST", "/plans", json={"name": "front"})
    daemon.call("POST", "/plans/front/vms", json={"group": 1, "vms": ["web01"]})
    page.goto(portal_url(daemon) + "/plans/app")
    expect(boot_group(page, 1).locator('tr[data-vm="db01"]')).to_contain_text("app")
    operation(page, "Failover")
    page.get_by_label("Latest app-consistent").check()
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#plan-preview")).to_contain_text("Every precondition passes")
    for vm in ("web01", "db01"):
        expect(preview_row(page, 1, vm).locator("td.point")).to_contain_text(common[vm])

    # A member alone is refused, and nothing changes.
    before = vault_snapshot(daemon, vault)
    page.goto(portal_url(daemon) + "/plans/front")
    operation(page, "Failover")
    page.get_by_label("I confirm").check()
    page.get_by_role("button", name="Start failover").click()
    flash = page.locator("#flash .error")
    expect(flash.locator(".code")).to_have_text("GROUP_MEMBER_ALONE")
    expect(flash.locator(".message")).to_contain_text("replication group 'app'")
    assert vault_snapshot(daemon, vault) == before

    # Failed over and committed (set-up through the API), the plan offers its failback.
    job(daemon, daemon.call("POST", "/plans/app/failover", json={"type": "unplanned"}))
    job(daemon, daemon.call("POST", "/plans/app/commit"))
    page.goto(portal_url(daemon) + "/plans/app")
    operation(page, "Failback")
    delta = page.get_by_label("Synchronize data before failover (synchronize delta changes only)")
    expect(delta).to_be_checked()
    expect(page.locator("#sync-delta-help")).to_contain_text("Phase 1")
    expect(page.locator("#sync-full-help")).to_contain_text("no checksum")
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#plan-preview")).to_contain_text("Every precondition passes")
    for vm in ("web01", "db01"):
        expect(preview_row(page, 1, vm)).to_contain_text("failback")
    shoot(page, "plan-failback-dialog")
