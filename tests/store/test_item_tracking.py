"""The repository's side of an item's tracking, on SQLite and on PostgreSQL: the
column's JSON, older vaults' rows, and read-modify-write under the row's lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, update

from siterecovery.domain.errors import InternalError, ItemNotFound
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import DiskDef, Host, Item, OsType, Policy, Site, SiteRole, Vm
from siterecovery.domain.tracking import SCHEMA, ItemTracking
from siterecovery.store.repo import VaultStore
from siterecovery.store.schema import ItemRow

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture
def item(store: VaultStore) -> str:
    store.add_site(site=Site("onprem", "local", "/srv/a", SiteRole.ON_PREMISES))
    store.add_site(site=Site("cloud", "local", "/srv/b", SiteRole.CLOUD))
    store.add_host(host=Host("onprem", "hv01", ()))
    store.add_vm(vm=Vm("web01", "onprem", "hv01", OsType.LINUX, (DiskDef("d0", 1 << 20),), ()))
    store.add_item(item=Item("web01", "onprem", "cloud", ItemState.PROTECTED, Policy(), T0))
    return "web01"


def _column(store: VaultStore, vm: str) -> Any:
    with store.session() as s:
        return s.scalar(select(ItemRow.tracking).where(ItemRow.vm == vm))


def _set_column(store: VaultStore, vm: str, data: dict[str, Any]) -> None:
    with store.session() as s:
        s.execute(update(ItemRow).where(ItemRow.vm == vm).values(tracking=data))


def test_a_new_item_remembers_nothing(store: VaultStore, item: str) -> None:
    assert _column(store, item) == {"schema": SCHEMA}
    assert store.item_tracking(vm=item) == ItemTracking()


def test_an_update_is_written_and_returned(store: VaultStore, item: str) -> None:
    changed = store.update_item_tracking(
        vm=item, change=lambda t: replace(t, next_seq=3, pinned=("web01-000002",))
    )
    assert (
        changed
        == store.item_tracking(vm=item)
        == ItemTracking(next_seq=3, pinned=("web01-000002",))
    )
    assert _column(store, item) == {"schema": SCHEMA, "next_seq": 3, "pinned": ["web01-000002"]}


def test_a_schema_0_row_is_read_and_upgraded_by_the_next_write(
    store: VaultStore, item: str
) -> None:
    old = {"home": "onprem", "hosts": {"onprem": "hv01"}, "next_seq": 2, "resume": None,
           "busy": "j0123456789abcdef"}  # fmt: skip
    _set_column(store, item, old)
    assert store.item_tracking(vm=item) == ItemTracking(
        home="onprem", hosts={"onprem": "hv01"}, next_seq=2
    )
    store.update_item_tracking(vm=item, change=lambda t: replace(t, next_seq=3))
    assert _column(store, item) == {
        "schema": SCHEMA, "home": "onprem", "hosts": {"onprem": "hv01"}, "next_seq": 3,
    }  # fmt: skip


def test_a_newer_schema_is_neither_read_nor_overwritten(store: VaultStore, item: str) -> None:
    newer = {"schema": SCHEMA + 1, "next_seq": 7, "something_new": {"a": 1}}
    _set_column(store, item, newer)
    with pytest.raises(InternalError, match=f"schema {SCHEMA + 1}"):
        store.item_tracking(vm=item)
    with pytest.raises(InternalError, match=f"schema {SCHEMA + 1}"):
        store.update_item_tracking(vm=item, change=lambda t: replace(t, next_seq=8))
    assert _column(store, item) == newer


def test_a_failed_change_leaves_the_row_as_it_was(store: VaultStore, item: str) -> None:
    store.update_item_tracking(vm=item, change=lambda t: replace(t, next_seq=2))
    with pytest.raises(TypeError, match="nxt_seq"):
        store.update_item_tracking(vm=item, change=lambda t: replace(t, nxt_seq=3))  # type: ignore[call-arg]
    assert _column(store, item) == {"schema": SCHEMA, "next_seq": 2}


def test_a_missing_item_is_not_found(store: VaultStore) -> None:
    with pytest.raises(ItemNotFound):
        store.item_tracking(vm="db01")
    with pytest.raises(ItemNotFound):
        store.update_item_tracking(vm="db01", change=lambda t: t)


ROUNDS = 25


def _together(*bodies: Any) -> None:
    """Run ``bodies`` in threads started at one instant; re-raise the first error."""
    start = threading.Barrier(len(bodies))
    errors: list[BaseException] = []

    def run(body: Any) -> None:
        start.wait()
        try:
            body()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


Change = Callable[[ItemTracking], ItemTracking]


def _slowly(change: Change) -> Change:
    """``change`` after a pause with the row read: a lost update would show."""

    def slow(tracking: ItemTracking) -> ItemTracking:
        time.sleep(0.002)
        return change(tracking)

    return slow


def test_concurrent_updates_of_different_fields_all_survive(store: VaultStore, item: str) -> None:
    def count() -> None:
        for _ in range(ROUNDS):
            store.update_item_tracking(
                vm=item, change=_slowly(lambda t: replace(t, next_seq=t.next_seq + 1))
            )

    def pin() -> None:
        for n in range(ROUNDS):
            store.update_item_tracking(
                vm=item, change=_slowly(lambda t, n=n: replace(t, pinned=(*t.pinned, f"p{n}")))
            )

    _together(count, pin)
    final = store.item_tracking(vm=item)
    assert final.next_seq == 1 + ROUNDS
    assert final.pinned == tuple(f"p{n}" for n in range(ROUNDS))


def test_concurrent_updates_of_one_field_all_survive(store: VaultStore, item: str) -> None:
    def host(site: str) -> Any:
        def body() -> None:
            for n in range(ROUNDS):
                store.update_item_tracking(
                    vm=item,
                    change=_slowly(lambda t, n=n: replace(t, hosts={**t.hosts, f"{site}{n}": "h"})),
                )

        return body

    _together(host("a"), host("b"))
    assert len(store.item_tracking(vm=item).hosts) == 2 * ROUNDS
