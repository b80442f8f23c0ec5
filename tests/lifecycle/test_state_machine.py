"""The replicated-item lifecycle as a state machine, against the real daemon.

Hypothesis drives random sequences of operations (protect, replicate, drills,
failovers to random points, commit, failback delta or full, complete, cancel,
reprotect, disable) on one small VM per sequence, every sequence on the same
daemon and lab (a new VM is what keeps sequences independent: starting a
daemon per sequence would cost more than the sequence). The model
(``model.py``) predicts from the lifecycle table and the documented rules
whether each operation is accepted; the daemon must agree:

- accepted: its job succeeds (a delta failback pauses in awaiting-completion
  until ``complete``; ``cancel`` ends it cancelled) and the item moves as the
  table's operations say;
- refused: a 4xx answer with the predicted code, and nothing in the vault or
  the replica files changed (``vault_snapshot``).

After every step: the item's state is a lifecycle state and is the predicted
one, ``allowed_operations`` is what ``ALLOWED`` says for it, the direction,
the recovery points, the VM's copies and the drill are as predicted, and a
VM holding an interrupted sync refuses to start (409 ``VM_INCONSISTENT``).
A planned failover and a failback lose no acknowledged record: the survivor's
``vm check`` reaches the seq the guest acknowledged when the source stopped.

The bound is ``SR_FSM_EXAMPLES`` sequences of at most ``SR_FSM_STEPS`` steps
(``make test-lifecycle`` runs the issue's 20 x 12); ``SR_FSM_SHRINK=0`` skips
shrinking a failure (Hypothesis gives up shrinking after 5 minutes anyway).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from siterecovery.domain.lifecycle import ItemState

from ..conftest import Daemon, _stop_vms, vault_snapshot
from ..failover.support import check, job, step
from .model import OPS, Model, other, refusal, status_of

EXAMPLES = int(os.environ.get("SR_FSM_EXAMPLES", "3"))
STEPS = int(os.environ.get("SR_FSM_STEPS", "8"))
SHRINK = os.environ.get("SR_FSM_SHRINK", "1") != "0"
DISK = "128M"
NO_JOB = "j000000000000"

WEIGHTS = {
    "planned-failover": 2,
    "unplanned-failover": 2,
    "commit": 3,
    "failback-delta": 3,
    "failback-full": 3,
    "complete": 2,
    "cancel": 2,
    "reprotect": 2,
}
"""How much likelier a move is than the others (the deep states need the moves
that lead there; replicate and drills are as likely as one refusal)."""

S = ItemState
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon and lab for the whole run; the lab's own VMs stopped (CPU)."""
    vault = tmp_path_factory.mktemp("lifecycle") / "vault"
    running = Daemon(vault).start(lab=True)
    try:
        for vm in ("web01", "db01"):
            running.call("POST", f"/vms/{vm}/stop")
        yield running
    finally:
        if running.process is not None and running.process.poll() is None:
            try:
                running.call("POST", "/lab/down")
            finally:
                running.stop()
        _stop_vms(vault)


class Lifecycle(RuleBasedStateMachine):
    """One sequence: a new VM at onprem, then operations on it."""

    daemon: Daemon
    names = itertools.count(1)
    codes: dict[tuple[Any, ...], str] = {}
    """(operation, state, predicted codes) -> the code the daemon answered first."""
    counts: dict[str, int] = {}
    """How often each operation ran, accepted or refused (printed at the end)."""
    states: dict[str, int] = {}
    """How often each state was checked after a step (printed at the end)."""

    def __init__(self) -> None:
        super().__init__()
        name = f"fsm{next(self.names):03d}"
        self.call("POST", "/vms", json={"name": name, "host": "hv01", "disks": [DISK]})
        self.m = Model(vm=name)
        self.disables = 0

    @initialize(data=st.data())
    def begin(self, data: st.DataObject) -> None:
        """Most sequences start protected: the steps go further into the lifecycle."""
        if data.draw(st.booleans(), label="start protected"):
            self.protect(data)

    def moves(self) -> dict[str, Any]:
        """The operations the model says are accepted now, by name, and their rules."""
        m = self.m
        table = {
            "protect": (self.can("protect"), self.protect),
            "replicate": (self.can("replicate"), self.replicate),
            "test-failover": (self.can("test-failover"), self.drill),
            "cleanup-test": (self.can("cleanup-test"), self.cleanup_test),
            "planned-failover": (
                m.state is S.PROTECTED and self.can("planned-failover"),
                self.planned_failover,
            ),
            "unplanned-failover": (self.can("unplanned-failover"), self.unplanned_failover),
            "commit": (self.can("commit"), self.commit),
            "failback-delta": (
                m.is_failback() and self.can("planned-failover"),
                self.failback_delta,
            ),
            "failback-full": (m.is_failback() and self.can("planned-failover"), self.failback_full),
            "complete": (self.can("complete"), self.complete),
            "cancel": (self.can("cancel"), self.cancel),
            "reprotect": (self.can("reprotect"), self.reprotect),
            # Once per sequence: protect → disable → protect loops teach little.
            "disable": (self.can("disable") and self.disables == 0, self.disable),
            "delete-stale-copy": (
                m.state in (None, S.DISABLED) and len(m.copies) > 1,
                self.delete_stale_copy,
            ),
        }
        return {name: run for name, (ok, run) in table.items() if ok}

    @rule(data=st.data())
    def operate(self, data: st.DataObject) -> None:
        """One step: an operation the model accepts, or one it refuses (``refused``)."""
        moves = self.moves()
        choices = [n for n in moves for _ in range(WEIGHTS.get(n, 1))] + ["refused"]
        name = data.draw(st.sampled_from(choices), label="operation")
        self.counts[name] = self.counts.get(name, 0) + 1
        moves.get(name, self.refused)(data)

    def teardown(self) -> None:
        if self.m.waiting is not None:
            self.call("POST", f"/jobs/{self.m.waiting}/cancel")
            self.daemon.wait_job(self.m.waiting)
        for vm in self.call("GET", "/vms"):
            if vm["name"] in (self.m.vm, f"{self.m.vm}-test"):
                self.call("POST", f"/vms/{vm['name']}/stop", params={"site": vm["site"]})

    # The daemon -----------------------------------------------------------------

    @property
    def vault(self) -> Path:
        return self.daemon.vault

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.daemon.call(method, path, **kwargs)

    def request(self, op: str, params: dict[str, Any]) -> Any:
        """The HTTP response of ``op`` (nothing asserted)."""
        vm = self.m.vm
        assert self.daemon.client is not None
        post = self.daemon.client.post
        if op == "protect":
            body = {"vm": vm, "to": self.m.standby, "interval": "1h"}
            return post("/items", json=body)
        if op == "replicate":
            return post(f"/items/{vm}/replicate", json={"app_consistent": params["app"]})
        if op in ("test-failover", "planned-failover", "unplanned-failover"):
            body = {"type": op.split("-")[0], **params}
            return post(f"/items/{vm}/failover", json=body)
        if op in ("complete", "cancel"):
            job_id = self.m.waiting or self.m.last_job or NO_JOB
            return post(f"/jobs/{job_id}/{op}")
        if op in ("commit", "reprotect"):
            return post(f"/items/{vm}/{op}", json={})
        return post(f"/items/{vm}/{op}")  # cleanup-test, disable

    def accepted(self, op: str, **params: Any) -> Any:
        """Run ``op``, which the model says is accepted; its answer."""
        response = self.request(op, params)
        assert response.status_code < 300, (op, params, response.status_code, response.text)
        answer = response.json()
        if isinstance(answer, dict) and "job" in answer:
            self.m.last_job = answer["job"]
        return answer

    def selectors(self, op: str) -> list[str]:
        ids = [p["id"] for p in self.m.points[self.m.recovery_site()]] if self.m.state else []
        if op == "test-failover":
            ids = [p["id"] for p in self.m.points[self.m.standby]] if self.m.state else []
        return ["latest", "latest-app-consistent", *ids]

    def variants(self, op: str) -> list[dict[str, Any]]:
        """The parameters the machine tries ``op`` with."""
        if op == "replicate":
            return [{"app": False}, {"app": True}]
        if op in ("test-failover", "unplanned-failover"):
            return [{"point": p} for p in self.selectors(op)]
        if op == "planned-failover":
            return [
                {"sync": s, "create_vm": c}
                for s, c in itertools.product(("delta", "full"), (False, True))
            ]
        return [{}]

    def accepted_variants(self, op: str) -> list[dict[str, Any]]:
        return [p for p in self.variants(op) if not refusal(self.m, op, **_model_args(p))]

    def can(self, op: str) -> bool:
        return bool(self.accepted_variants(op))

    def points_grew(self, site: str, new: int) -> None:
        """The standby's listing is the model's plus ``new`` points (then the model's)."""
        listing = self.call("GET", f"/items/{self.m.vm}/points")
        known = [p["id"] for p in self.m.points[site]]
        ids = [p["id"] for p in listing]
        assert ids[: len(known)] == known and len(ids) == len(known) + new, (known, ids)
        self.m.points[site] = listing

    def survivor_has_every_acknowledged_record(self, done: dict[str, Any]) -> None:
        """Zero data loss: the started VM's disks reach the seq acknowledged at stop-source."""
        acked = step(done, "stop-source")["acknowledged_seq"]
        assert acked is not None and acked > 0, step(done, "stop-source")
        report = check(self.daemon, self.m.vm, self.m.active)
        assert report["last_seq"] >= acked, (report, acked)

    # Accepted operations --------------------------------------------------------

    def protect(self, data: st.DataObject) -> None:
        job(self.daemon, self.accepted("protect"))
        m = self.m
        m.state, m.home = S.PROTECTED, m.home or m.active
        self.points_grew(m.standby, 1)

    def replicate(self, data: st.DataObject) -> None:
        app = data.draw(st.booleans(), label="app_consistent")
        report = self.accepted("replicate", app=app)
        assert report["point"]["type"] == ("app-consistent" if app else "crash-consistent")
        self.points_grew(self.m.standby, 1)

    def drill(self, data: st.DataObject) -> None:
        params = data.draw(st.sampled_from(self.accepted_variants("test-failover")), label="point")
        done = job(self.daemon, self.accepted("test-failover", **params))
        self.m.drill = True
        check(self.daemon, f"{self.m.vm}-test", self.m.standby)
        assert done["result"]["drill"]["vm"] == f"{self.m.vm}-test"

    def cleanup_test(self, data: st.DataObject) -> None:
        job(self.daemon, self.accepted("cleanup-test"))
        self.m.drill = False

    def planned_failover(self, data: st.DataObject) -> None:
        m = self.m
        done = job(self.daemon, self.accepted("planned-failover"))
        final = step(done, "final-replication")["point"]
        assert done["result"]["zero_data_loss"]["point"] == final["id"], done["result"]
        m.points[m.standby].append(final)
        m.state, m.active = S.FAILED_OVER, m.standby
        m.copies.add(m.active)
        assert self.call("GET", f"/items/{m.vm}")["failover"]["point"] == final["id"]
        self.survivor_has_every_acknowledged_record(done)

    def unplanned_failover(self, data: st.DataObject) -> None:
        m = self.m
        params = data.draw(
            st.sampled_from(self.accepted_variants("unplanned-failover")), label="point"
        )
        point = m.select(params["point"])
        assert point is not None
        rerun = m.state is S.FAILED_OVER
        done = job(self.daemon, self.accepted("unplanned-failover", **params))
        if rerun:
            assert step(done, "remove-previous-failover")["deleted"] == f"{m.vm}@{m.active}"
        else:
            m.state, m.active = S.FAILED_OVER, m.standby
            m.copies.add(m.active)
        assert self.call("GET", f"/items/{m.vm}")["failover"]["point"] == point["id"]
        report = check(self.daemon, m.vm, m.active)
        if point.get("workload_seq") is not None:
            assert report["last_seq"] >= point["workload_seq"], (report, point)

    def commit(self, data: st.DataObject) -> None:
        m = self.m
        done = job(self.daemon, self.accepted("commit"))
        m.state = S.COMMITTED
        if m.active == m.home:
            assert step(done, "commit")["deleted"] == f"{m.vm}@{m.standby}"
            m.copies.discard(m.standby)
            m.marked.discard(m.standby)

    def failback_delta(self, data: st.DataObject) -> None:
        create_vm = data.draw(st.booleans(), label="create_vm")
        self._failback("delta", create_vm)

    def failback_full(self, data: st.DataObject) -> None:
        create_vm = data.draw(st.booleans(), label="create_vm")
        self._failback("full", create_vm)

    def _failback(self, sync: str, create_vm: bool) -> None:
        m = self.m
        params = {"sync": sync, "create_vm": create_vm or m.standby not in m.copies}
        started = self.accepted("planned-failover", **params)
        assert started["kind"] == "failback", started
        m.copies.add(m.standby)
        if sync == "delta":
            waiting = job(self.daemon, started, "awaiting-completion")
            assert step(waiting, "phase1-sync")
            m.state, m.waiting = S.AWAITING_COMPLETION, started["job"]
            m.marked.add(m.standby)
            return
        self._failed_back(job(self.daemon, started))

    def _failed_back(self, done: dict[str, Any]) -> None:
        m = self.m
        assert done["result"]["integrity"]["equal"] is True, done["result"]
        m.state, m.active, m.waiting = S.FAILED_OVER, m.standby, None
        m.marked.discard(m.active)
        self.survivor_has_every_acknowledged_record(done)

    def complete(self, data: st.DataObject) -> None:
        waiting = self.m.waiting
        self.accepted("complete")
        self._failed_back(job(self.daemon, {"job": waiting}))

    def cancel(self, data: st.DataObject) -> None:
        waiting = self.m.waiting
        self.accepted("cancel")
        cancelled = job(self.daemon, {"job": waiting}, "cancelled")
        assert cancelled["error"]["code"] in ("JOB_CANCELLED", "SYNC_CANCELLED"), cancelled
        self.m.state, self.m.waiting = S.INCONSISTENT, None

    def reprotect(self, data: st.DataObject) -> None:
        m = self.m
        done = job(self.daemon, self.accepted("reprotect"))
        m.state = S.PROTECTED
        if m.standby in m.copies:
            assert step(done, "adopt-base")["base"] == f"VM {m.vm} at {m.standby}"
        m.copies.discard(m.standby)
        m.marked.discard(m.standby)
        self.points_grew(m.standby, 1)

    def disable(self, data: st.DataObject) -> None:
        self.disables += 1
        item = self.accepted("disable")
        assert item["state"] == "disabled", item
        self.m.state = S.DISABLED
        self.m.points = {s: [] for s in self.m.points}

    def delete_stale_copy(self, data: st.DataObject) -> None:
        """Not a lifecycle operation: what a user does so that `protect` can name the VM."""
        stale = other(self.m.active)
        self.call("DELETE", f"/vms/{self.m.vm}", params={"site": stale})
        self.m.copies.discard(stale)
        self.m.marked.discard(stale)

    # Refused operations ---------------------------------------------------------

    def refused(self, data: st.DataObject) -> None:
        options = [
            (op, params)
            for op in OPS
            for params in self.variants(op)
            if refusal(self.m, op, **_model_args(params))
        ]
        op, params = data.draw(st.sampled_from(options), label="refused")
        codes = refusal(self.m, op, **_model_args(params))
        self.counts[f"refused {op}"] = self.counts.get(f"refused {op}", 0) + 1
        self.counts["refused"] -= 1  # counted by operation instead
        before = vault_snapshot(self.daemon, self.vault)
        response = self.request(op, params)
        assert 400 <= response.status_code < 500, (op, params, response.status_code, response.text)
        error = response.json()["error"]
        assert error["code"] in codes, (op, params, self.m.state, codes, error)
        assert response.status_code == status_of(error["code"]), (response.status_code, error)
        key = (op, self.m.state, tuple(sorted(codes)))
        assert self.codes.setdefault(key, error["code"]) == error["code"], (key, error)
        assert vault_snapshot(self.daemon, self.vault) == before, (op, params)

    # Invariants -----------------------------------------------------------------

    @invariant()
    def item_is_as_predicted(self) -> None:
        m = self.m
        assert self.daemon.client is not None
        response = self.daemon.client.get(f"/items/{m.vm}")
        if m.state is None:
            assert response.status_code == 404, response.text
            return
        item = response.json()
        self.states[item["state"]] = self.states.get(item["state"], 0) + 1
        assert item["state"] in {s.value for s in ItemState}, item
        assert item["state"] == m.state.value, (item["state"], m.state)
        assert item["allowed_operations"] == m.allowed_operations(), item
        assert (item["active_site"], item["standby_site"]) == (m.active, m.standby), item
        assert item["busy_job"] == m.waiting, item
        assert bool(item["drill"]) == m.drill, item
        listing = [p["id"] for p in self.call("GET", f"/items/{m.vm}/points")]
        assert listing == [p["id"] for p in m.points[m.standby]], listing
        m.last_error = item["last_error"] is not None

    @invariant()
    def copies_are_as_predicted(self) -> None:
        sites = {v["site"] for v in self.call("GET", "/vms") if v["name"] == self.m.vm}
        assert sites == self.m.copies, (sites, self.m.copies)

    @invariant()
    def an_inconsistent_vm_never_starts(self) -> None:
        for site in sorted(self.m.marked):
            before = vault_snapshot(self.daemon, self.vault)
            status, error = self.daemon.error(
                "POST", f"/vms/{self.m.vm}/start", params={"site": site}
            )
            assert (status, error["code"]) == (409, "VM_INCONSISTENT"), error
            assert vault_snapshot(self.daemon, self.vault) == before


def _model_args(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k in ("point", "create_vm")}


@pytest.mark.timeout(120 + 3 * EXAMPLES * STEPS + (330 if SHRINK else 0))
def test_lifecycle_state_machine(lab: Daemon) -> None:
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else [])
    machine = type("LifecycleOnLab", (Lifecycle,), {"daemon": lab})
    started = time.monotonic()
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            phases=phases,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    sequences = next(Lifecycle.names) - 1
    print(
        f"\nlifecycle state machine: {sequences} sequences (max_examples={EXAMPLES}, "
        f"up to {STEPS} steps), {sum(Lifecycle.counts.values())} steps, "
        f"{time.monotonic() - started:.0f} s; invariants held. Rules run: "
        + ", ".join(f"{k} {v}" for k, v in sorted(Lifecycle.counts.items()) if v)
        + ". States seen: "
        + ", ".join(f"{k} {v}" for k, v in sorted(Lifecycle.states.items()))
    )
