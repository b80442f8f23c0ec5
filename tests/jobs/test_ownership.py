"""Item ownership is one compare-and-set in the vault: of many takers started
together exactly one wins, on SQLite and on PostgreSQL, across processes."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import threading
from pathlib import Path

import pytest

from siterecovery.domain.errors import ItemNotFound
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import Host, Item, OsType, Policy, Site, SiteRole, Vm, utcnow
from siterecovery.store.repo import VaultStore

TAKERS = 8


def _store(url: str) -> VaultStore:
    store = VaultStore(url)
    for name in ("a", "b"):
        store.add_site(site=Site(name=name, provider="local", path=f"/nowhere/{name}",
                                 role=SiteRole.ON_PREMISES))  # fmt: skip
    store.add_host(host=Host(site="a", name="h", switches=("s",)))
    for vm in ("web", "db"):
        store.add_vm(vm=Vm(name=vm, site="a", host="h", os=OsType.LINUX, disks=(), nics=()))
        item = Item(vm=vm, active_site="a", standby_site="b", state=ItemState.PROTECTED,
                    policy=Policy(), created=utcnow())  # fmt: skip
        store.add_item(item=item)
    return store


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'vault.sqlite'}"
    db: str = request.getfixturevalue("postgres_db")
    return db


def _race(url: str, owner: str, barrier: threading.Barrier, out: list[str | None]) -> None:
    store = VaultStore(url, migrate=False)
    try:
        barrier.wait()
        out.append(None if store.take_item(vm="web", owner=owner) is None else owner)
    finally:
        store.close()


def test_exactly_one_of_many_threads_takes_the_item(url: str) -> None:
    _store(url).close()
    barrier = threading.Barrier(TAKERS)
    out: list[str | None] = []
    threads = [
        threading.Thread(target=_race, args=(url, f"j{i:012d}", barrier, out))
        for i in range(TAKERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in out if o is None]
    assert len(out) == TAKERS and len(winners) == 1, out
    store = VaultStore(url, migrate=False)
    owner, claim = store.item_owner(vm="web")
    assert owner is not None and owner not in [o for o in out if o] and claim is None
    store.close()


def _process_taker(url: str, owner: str, start: multiprocessing.synchronize.Event) -> None:
    store = VaultStore(url, migrate=False)
    start.wait()
    won = store.take_item(vm="web", owner=owner) is None
    Path(url.split("///")[-1] + f".{owner}").write_text("won" if won else "lost")
    store.close()


def test_exactly_one_of_several_processes_takes_the_item(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'vault.sqlite'}"
    _store(url).close()
    start = multiprocessing.get_context("spawn").Event()
    ctx = multiprocessing.get_context("spawn")
    owners = [f"j{i:012d}" for i in range(4)]
    procs = [ctx.Process(target=_process_taker, args=(url, o, start)) for o in owners]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(timeout=60)
    results = [Path(f"{tmp_path / 'vault.sqlite'}.{o}").read_text() for o in owners]
    assert sorted(results) == ["lost"] * 3 + ["won"], results


def test_take_is_idempotent_and_release_only_by_the_owner(url: str) -> None:
    store = _store(url)
    assert store.take_item(vm="web", owner="j1") is None
    assert store.take_item(vm="web", owner="j1") is None  # a re-run step
    assert store.take_item(vm="web", owner="j2") == "j1"
    assert store.release_item(vm="web", owner="j2") is False
    assert store.item_owner(vm="web") == ("j1", None)
    assert store.release_item(vm="web", owner="j1") is True
    assert store.item_owner(vm="web") == (None, None)
    with pytest.raises(ItemNotFound):
        store.take_item(vm="nothere", owner="j1")
    store.close()


def test_a_claim_is_handed_over_by_the_passes_release(url: str) -> None:
    store = _store(url)
    assert store.take_item(vm="web", owner="pass:c1") is None
    assert store.claim_item(vm="web", claimant="j9") is True
    assert store.claim_item(vm="web", claimant="j8") is False  # one claimant
    assert store.take_item(vm="web", owner="j8") == "pass:c1"
    assert store.release_item(vm="web", owner="pass:c1") is True
    assert store.item_owner(vm="web") == ("j9", None)
    assert store.claim_item(vm="web", claimant="j7") is False  # a job is never preempted
    store.close()


def test_taking_several_items_is_all_or_nothing(url: str) -> None:
    store = _store(url)
    assert store.take_item(vm="db", owner="j1") is None
    assert store.take_items(owners={"web": "j2", "db": "j2"}) == {"db": "j1"}
    assert store.item_owner(vm="web") == (None, None)  # rolled back
    store.release_item(vm="db", owner="j1")
    assert store.take_items(owners={"web": "j2", "db": "j2"}) == {}
    assert store.item_owner(vm="db")[0] == "j2"
    store.close()


def test_stale_owners_are_freed_but_live_jobs_keep_theirs(url: str) -> None:
    store = _store(url)
    store.take_item(vm="web", owner="pass:c1")
    store.take_item(vm="db", owner="j000000000001")  # no such job: stale
    assert sorted(store.release_stale_owners()) == ["db", "web"]
    store.take_item(vm="db", owner="j000000000002")
    assert store.release_stale_owners(live_jobs=["j000000000002"]) == []
    assert store.item_owner(vm="db")[0] == "j000000000002"
    store.close()
