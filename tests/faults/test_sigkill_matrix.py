"""SIGKILL at every step of every job type, the daemon restarted on the same vault.

The steps are not written here: ``steps.json`` is what a traced run of each
scenario's workflow ran (``SITERECOVERY_FAULT_TRACE``), and the first tests
re-trace every scenario and fail when the workflow's steps changed (run with
``SR_FAULTS_REGENERATE=1`` to rewrite the file). A wait for the user
(``(awaiting-completion)``, ``(awaiting-action)``) is no step: the daemon is
killed while the job waits in it. The file also lists the job kinds the
scenario's set-up runs: a fault on any other kind is armed from the daemon's
first start (a daemon start costs seconds), else the daemon is restarted with
it after the set-up.

Each case, on a fresh lab: set up under
``SITERECOVERY_FAULT=KIND:STEP:before|after:kill``, start the job, let the
fault kill the daemon, start it again without the fault. Then the job must
either resume and succeed, or end failed with its item in a stable state of
the lifecycle (not busy, an ``inconsistent`` VM refusing to start) and a re-run
of the same request must succeed. Either way the end state is checked: item
state, digests, and no acknowledged guest record lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from siterecovery.jobs.faults import FAULT_ENV, TRACE_ENV

from ..conftest import Daemon
from .conftest import FaultLab
from .driver import Driver
from .scenarios import BY_NAME, SCENARIOS, Scenario, acknowledged, point_holds, protect, survivor

pytestmark = [pytest.mark.faults, pytest.mark.slow]

REGISTRY = Path(__file__).with_name("steps.json")
REGENERATE = "SR_FAULTS_REGENERATE"
TRANSIENT = {"enabling", "reprotecting", "syncing", "awaiting-completion", "finalizing"}
"""States that say a job runs: no finished job may leave its item in one."""


def registry() -> dict[str, dict[str, list[Any]]]:
    if not REGISTRY.exists():
        return {}
    found: dict[str, dict[str, list[Any]]] = json.loads(REGISTRY.read_text())
    return found


def write_registry(entries: dict[str, dict[str, list[Any]]]) -> None:
    """One line per step, so that a diff of the file reads as a diff of the steps."""
    out = ["{"]
    for n, (name, entry) in enumerate(entries.items()):
        out.append(f' "{name}": {{')
        out.append(f'  "setup_kinds": {json.dumps(entry["setup_kinds"])},')
        out.append('  "steps": [')
        out.append(",\n".join(f"   {json.dumps(s)}" for s in entry["steps"]))
        out.append("  ]")
        out.append(" }" + ("," if n < len(entries) - 1 else ""))
    out.append("}")
    REGISTRY.write_text("\n".join(out) + "\n")


def cases() -> list[Any]:
    params = []
    entries = registry()
    for scenario in SCENARIOS:
        for kind, step in entries.get(scenario.name, {}).get("steps", []):
            for when in ("during",) if step.startswith("(") else ("before", "after"):
                case_id = f"{scenario.name}:{kind}:{step}:{when}".replace(" ", "_")
                params.append(pytest.param(scenario.name, kind, step, when, id=case_id))
    return params


MARK = "-- the job under test --"


def traced(trace: Path) -> dict[str, list[Any]]:
    """The set-up's job kinds and the job's (kind, step) pairs, in order of
    first appearance, from a trace the test marked between the two."""
    setup, _, job = trace.read_text().partition(MARK + "\n")
    steps: list[list[str]] = []
    for line in job.splitlines():
        kind, _, step = line.partition(" ")
        if [kind, step] not in steps:
            steps.append([kind, step])
    kinds = sorted({line.partition(" ")[0] for line in setup.splitlines()})
    return {"setup_kinds": kinds, "steps": steps}


# The step list --------------------------------------------------------------------


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_the_step_list_is_the_workflows_own(name: str, fault_lab: FaultLab) -> None:
    """An unfaulted, traced run: it succeeds, passes its checks, and runs exactly
    the steps ``steps.json`` lists for it (so a new step is never missed)."""
    scenario, facts = BY_NAME[name], {}
    trace = fault_lab.vault.parent / "trace.txt"
    daemon = fault_lab.start(lab=True, env={TRACE_ENV: str(trace)})
    scenario.setup(daemon, facts)
    with trace.open("a") as out:
        out.write(MARK + "\n")
    job_id = scenario.start(daemon, facts)
    done = Driver(fault_lab.vault, trace=trace).drive(daemon, job_id)
    assert done["state"] == "succeeded", done
    assert scenario.verify(daemon, fault_lab.vault, facts, job_id) == 0
    steps = traced(trace)
    assert len(steps["steps"]) >= 1
    if os.environ.get(REGENERATE):
        write_registry({**registry(), name: steps})
    listed = registry().get(name)
    assert listed is not None and per_kind(listed) == per_kind(steps), (
        f"{name}: the workflow's steps are {steps}, steps.json says {listed};"
        f" regenerate with {REGENERATE}=1"
    )


def per_kind(steps: dict[str, Any]) -> dict[str, Any]:
    """Each job kind's steps in order: a plan's parent and children run at the
    same time, so only the order within one workflow is fixed."""
    kinds: dict[str, list[str]] = {}
    for kind, step in steps["steps"]:
        kinds.setdefault(kind, []).append(step)
    return {"setup_kinds": steps["setup_kinds"], "kinds": kinds}


# The kills ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind", "step", "when"), cases())
def test_sigkill(
    name: str, kind: str, step: str, when: str, fault_lab: FaultLab, matrix_row: dict[str, Any]
) -> None:
    scenario = BY_NAME[name]
    matrix_row.update(title=scenario.title, kind=kind, step=step, when=when, notes=[])
    started = time.monotonic()
    try:
        outcome, lost, notes = _kill_and_recover(scenario, kind, step, when, fault_lab)
    except BaseException as exc:
        matrix_row["outcome"] = f"FAILED: {type(exc).__name__}: {_short(exc)}"
        matrix_row["notes"].append(_states(fault_lab.daemon, scenario))
        raise
    finally:
        matrix_row["seconds"] = round(time.monotonic() - started)
    matrix_row.update(outcome=outcome, lost=lost)
    matrix_row["notes"].extend(notes)
    assert lost == 0


def _kill_and_recover(
    scenario: Scenario, kind: str, step: str, when: str, lab: FaultLab
) -> tuple[str, int, list[str]]:
    facts: dict[str, Any] = {}
    fault = {FAULT_ENV: f"{kind}:{step}:{when}:kill"}
    armed_early = when != "during" and kind not in registry()[scenario.name]["setup_kinds"]
    daemon = lab.start(lab=True, env=fault if armed_early else None)
    scenario.setup(daemon, facts)
    driver = Driver(lab.vault)
    if when == "during":
        job_id = scenario.start(daemon, facts)
        driver.until_state(daemon, job_id, step.strip("()"))
        daemon.kill()
    else:
        if not armed_early:
            daemon = lab.restart(env=fault)
        known = {j["id"] for j in daemon.call("GET", "/jobs")}
        try:
            job_id = scenario.start(daemon, facts)
        except httpx.TransportError:  # the fault fired before the request was answered
            assert daemon.process is not None
            daemon.process.wait(timeout=60)
            job_id = ""
        else:
            driver.until_killed(daemon, job_id)
    daemon = lab.restart()
    if not job_id:
        job_id = _started_while_dying(daemon, known)
        driver.notes.append("killed before the start request was answered")
    first = driver.drive(daemon, job_id)
    if first["state"] == "succeeded":
        return "resumed", scenario.verify(daemon, lab.vault, facts, job_id), driver.notes
    error = first.get("error") or {}
    notes = [
        *driver.notes,
        f"first run {first['state']}: {error.get('code')}: {error.get('message')}",
    ]
    _failed_cleanly(daemon, scenario, first)
    again = Driver(lab.vault)
    rerun = scenario.repair(daemon, facts)
    repaired = again.drive(daemon, rerun)
    assert repaired["state"] == "succeeded", repaired
    lost = scenario.verify(daemon, lab.vault, facts, rerun)
    return "failed cleanly, repaired by re-run", lost, notes + again.notes


def _started_while_dying(daemon: Daemon, known: set[str]) -> str:
    """The job whose start request the crash left unanswered (a plan's parent,
    not its children): it must exist, since its first step ran."""
    new = [j for j in daemon.call("GET", "/jobs") if j["id"] not in known]
    top = [j["id"] for j in new if "parent" not in (j.get("params") or {})]
    assert len(top) == 1, f"expected the one job the request started: {new}"
    return str(top[0])


def _failed_cleanly(daemon: Daemon, scenario: Scenario, job: dict[str, Any]) -> None:
    """A clear failure: an error on the job; every item stable and free; a VM
    marked inconsistent refuses to start."""
    assert job["error"] and job["error"].get("code"), job
    for child in (job.get("result") or {}).get("children", {}).values():
        if _exists(daemon, child):  # a plan's children end before its items are judged
            Driver(daemon.vault).drive(daemon, child)
    for vm in scenario.vms:
        found = daemon.call("GET", f"/items/{vm}") if _item_exists(daemon, vm) else None
        if found is None:
            continue
        assert found["state"] not in TRANSIENT, found
        assert found["busy_job"] is None, found
        marked = [v for v in daemon.call("GET", "/vms") if v["power"] == "inconsistent"]
        if found["state"] == "inconsistent":
            assert any(v["name"] == vm for v in marked), (found, marked)
        for v in marked:
            status, error = daemon.error(
                "POST", f"/vms/{v['name']}/start", params={"site": v["site"]}
            )
            assert (status, error["code"]) == (409, "VM_INCONSISTENT"), error


def _exists(daemon: Daemon, job_id: str) -> bool:
    assert daemon.client is not None
    return daemon.client.get(f"/jobs/{job_id}").status_code == 200


def _item_exists(daemon: Daemon, vm: str) -> bool:
    assert daemon.client is not None
    return daemon.client.get(f"/items/{vm}").status_code == 200


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:700]


def _states(daemon: Daemon, scenario: Scenario) -> str:
    """Item and job states at the failure, for the table (best effort)."""
    try:
        items = [daemon.call("GET", f"/items/{vm}") for vm in scenario.vms]
        jobs = daemon.call("GET", "/jobs")[:4]
    except (httpx.HTTPError, AssertionError) as exc:
        return f"(states unavailable: {type(exc).__name__})"
    shown = [f"{i['vm']}: {i['state']} busy={i['busy_job']}" for i in items]
    shown += [f"job {j['kind']} {j['state']}" for j in jobs]
    return ", ".join(shown)


# Group point (not a job: no steps; killed at moments through it) ---------------------


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_sigkill_during_a_group_point(
    fraction: float, fault_lab: FaultLab, matrix_row: dict[str, Any]
) -> None:
    """A group point is a synchronous call, not a job: the daemon is killed at
    ``fraction`` of a measured group point's duration. After the restart no
    common id held by only some members is selected, the members are free and
    protected, and the next group point works and holds every record."""
    matrix_row.update(title="group point", kind="(no job)", step=f"at {fraction:.0%}",
                      when="during", notes=[])  # fmt: skip
    started = time.monotonic()
    try:
        landed, lost = _group_point(fraction, fault_lab)
    except BaseException as exc:
        matrix_row["outcome"] = f"FAILED: {type(exc).__name__}: {_short(exc)}"
        raise
    finally:
        matrix_row["seconds"] = round(time.monotonic() - started)
    matrix_row.update(outcome="repaired by the next group point", lost=lost)
    matrix_row["notes"].append(landed)
    assert lost == 0


def _group_point(fraction: float, lab: FaultLab) -> tuple[str, int]:
    daemon = lab.start(lab=True)
    members = ("db01", "web01")
    for vm in members:
        protect(daemon, vm)
    daemon.call("POST", "/groups", json={"name": "app", "vms": list(members), "common_interval": 0})
    begun = time.monotonic()
    first = daemon.call("POST", "/groups/app/point")
    duration = time.monotonic() - begun
    assert daemon.client is not None
    client = daemon.client
    call = threading.Thread(target=_ignore_errors, args=(client, "/groups/app/point"))
    call.start()
    time.sleep(duration * fraction)
    daemon.kill()
    call.join()
    daemon = lab.restart()
    held = {vm: {p["common"] for p in daemon.call("GET", f"/items/{vm}/points") if p["common"]}
            for vm in members}  # fmt: skip
    second = first["common"].replace("c000001", "c000002")
    holders = [vm for vm in members if second in held[vm]]
    landed = f"the killed point sealed by {len(holders)}/{len(members)} members"
    latest = daemon.call("GET", "/groups/app")["latest_common"]
    assert latest is not None and set(latest["points"]) == set(members), latest
    assert latest["common"] in set.intersection(*held.values()), (latest, held)
    for vm in members:
        found = daemon.call("GET", f"/items/{vm}")
        assert (found["state"], found["busy_job"]) == ("protected", None), found
    repaired = daemon.call("POST", "/groups/app/point")
    lost = 0
    for vm in members:
        point = repaired["points"][vm]
        lost += point_holds(daemon, vm, point, repaired["workload_seqs"][vm] or 0)
        lost += survivor(daemon, vm, "onprem", acknowledged(lab.vault, vm, "onprem"))
    links = daemon.call(
        "GET", "/checks", params={"vm": list(members), "point": list(repaired["points"].values())}
    )
    assert links["consistent"], links
    return landed, lost


def _ignore_errors(client: httpx.Client, path: str) -> None:
    with contextlib.suppress(httpx.HTTPError):
        client.post(path)
