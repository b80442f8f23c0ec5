"""The vault repository, one contract run on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from siterecovery.domain.errors import AlreadyExists, ItemNotFound, SiteNotFound, VmNotFound
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import (
    DiskDef,
    Host,
    Item,
    Job,
    JobState,
    OsType,
    PointType,
    Policy,
    RecoveryPoint,
    Site,
    SiteRole,
    Vm,
)
from siterecovery.domain.tracking import ItemTracking, ResumeState
from siterecovery.store.repo import VaultStore

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def _inventory(store: VaultStore) -> None:
    store.add_site(site=Site("onprem", "local", "/srv/a", SiteRole.ON_PREMISES))
    store.add_site(site=Site("cloud", "local", "/srv/b", SiteRole.CLOUD))
    store.add_host(host=Host("onprem", "hv01", ("vswitch-prod",)))
    vm = Vm("web01", "onprem", "hv01", OsType.LINUX, (DiskDef("d0", 1 << 30),), ("vswitch-prod",))
    store.add_vm(vm=vm)


def test_inventory_round_trip(store: VaultStore) -> None:
    _inventory(store)
    assert [s.name for s in store.list_sites()] == ["cloud", "onprem"]
    assert store.get_host(name="hv01").switches == ("vswitch-prod",)
    vm = store.get_vm(name="web01")
    assert vm.disks == (DiskDef("d0", 1 << 30),) and vm.os is OsType.LINUX
    with pytest.raises(AlreadyExists):
        store.add_site(site=Site("cloud", "local", "/x", SiteRole.CLOUD))
    with pytest.raises(SiteNotFound):
        store.add_host(host=Host("mars", "hv02", ()))
    with pytest.raises(VmNotFound):
        store.get_vm(name="web01", site="cloud")


def test_items_points_and_tracking(store: VaultStore) -> None:
    _inventory(store)
    item = Item("web01", "onprem", "cloud", ItemState.ENABLING, Policy(interval=5.0), T0)
    store.add_item(item=item)
    updated = store.update_item(vm="web01", state=ItemState.PROTECTED, last_cycle=T0)
    assert updated.state is ItemState.PROTECTED and updated.last_cycle == T0
    assert updated.policy.interval == 5.0
    store.update_item_tracking(vm="web01", change=lambda t: replace(t, next_seq=2))
    resumed = store.update_item_tracking(
        vm="web01", change=lambda t: replace(t, resume=ResumeState("j1"))
    )
    assert resumed == ItemTracking(next_seq=2, resume=ResumeState("j1"))
    assert store.item_tracking(vm="web01") == resumed
    for seq in (1, 2, 3):
        store.add_point(
            point=RecoveryPoint(
                f"web01-{seq:06d}", "web01", "cloud", seq, T0 + timedelta(seconds=seq),
                PointType.CRASH_CONSISTENT, {"d0": f"p{seq:06d}.qcow2"},
            ),
            tracking=lambda t, seq=seq: replace(t, next_seq=seq + 1),
        )  # fmt: skip
    assert store.item_tracking(vm="web01").next_seq == store.next_point_seq(vm="web01") == 4
    # A number already given is refused with the tracking unchanged (one transaction).
    taken = RecoveryPoint("web01-000003", "web01", "cloud", 3, T0, PointType.CRASH_CONSISTENT, {})
    with pytest.raises(AlreadyExists):
        store.add_point(point=taken, tracking=lambda t: replace(t, next_seq=99))
    assert store.item_tracking(vm="web01").next_seq == 4
    # A vault whose tracking fell behind its points numbers past the newest point.
    store.update_item_tracking(vm="web01", change=lambda t: replace(t, next_seq=2))
    assert store.next_point_seq(vm="web01") == 4
    store.delete_points(ids=["web01-000001"])
    store.update_point_files(point_id="web01-000002", files={"d0": "p000001.qcow2"})
    points = store.list_points(vm="web01")
    assert [(p.seq, p.files["d0"]) for p in points] == [(2, "p000001.qcow2"), (3, "p000003.qcow2")]
    assert points[0].time == T0 + timedelta(seconds=2)  # timezone-aware on both backends
    with pytest.raises(ItemNotFound):
        store.update_item(vm="db01", state=ItemState.PROTECTED)


def test_jobs_steps_and_concurrent_writers(store: VaultStore) -> None:
    store.add_job(job=Job("j1", "protect", "web01", JobState.QUEUED, T0, T0, params={"vm": "x"}))
    store.record_step(job_id="j1", name="prepare", state="running")
    store.record_step(job_id="j1", name="prepare", state="succeeded", detail={"a": 1})
    store.record_step(job_id="j1", name="sync", state="running")

    def progress(worker: int) -> None:
        for n in range(20):
            store.update_job(job_id="j1", bytes_done=worker * 100 + n)
            store.merge_job_result(job_id="j1", **{f"w{worker}": n})

    threads = [threading.Thread(target=progress, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    job = store.get_job(job_id="j1")
    assert [(s.name, s.state) for s in job.steps] == [("prepare", "succeeded"), ("sync", "running")]
    assert job.steps[0].detail == {"a": 1} and job.steps[0].finished is not None
    assert job.result == {"w0": 19, "w1": 19, "w2": 19, "w3": 19}
    store.update_job(job_id="j1", cancel_requested=True, state=JobState.RUNNING)
    assert store.cancel_requested(job_id="j1")
