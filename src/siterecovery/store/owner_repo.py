"""Item ownership, taken atomically in the database (mixed into VaultStore).

Whoever changes an item's disks or replicas owns the item first: a job (its id)
or a replication pass (``pass:TAG``). Ownership is one conditional UPDATE — the
row changes only if nobody owns it — so of two requests started together exactly
one wins, in one process or several, on SQLite and on PostgreSQL.

A pass gives way to a user's operation: the operation writes its name in
``claim`` (only while a pass owns the item), the pass sees the claim at its next
chunk and stops, and its release hands the item to the claimant in the same
UPDATE (``owner = claim``), so nobody can slip in between.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from siterecovery.domain.errors import ItemNotFound
from siterecovery.domain.model import utcnow
from siterecovery.store.schema import ItemRow, JobRow

PASS_PREFIX = "pass:"


def is_job(owner: str) -> bool:
    """Whether ``owner`` is a job id (``j`` + hex, see ``jobs/runtime.new_job_id``);
    passes and synchronous operations are ``KIND:TAG``."""
    return owner.startswith("j") and ":" not in owner


TERMINAL_JOB_STATES = ("succeeded", "failed", "cancelled")


class ItemTaken(Exception):
    """Internal: rolls back an all-or-nothing take (carries the holders)."""

    def __init__(self, holders: dict[str, str]) -> None:
        super().__init__(holders)
        self.holders = holders


class OwnerRepo:
    """Compare-and-set ownership of items. Needs ``session()`` from its host class."""

    def session(self) -> AbstractContextManager[Session]:  # pragma: no cover - the host's
        raise NotImplementedError

    def take_item(self, *, vm: str, owner: str) -> str | None:
        """Make ``owner`` the item's owner if nobody (or ``owner`` itself) owns it.

        Returns None when ``owner`` holds the item afterwards, else the holder.
        Idempotent for the same owner (a re-run step takes what it holds).
        """
        holders = self.take_items(owners={vm: owner})
        return holders.get(vm)

    def take_items(self, *, owners: dict[str, str]) -> dict[str, str]:
        """Take every item of ``owners`` (vm → owner) or none of them.

        Returns {} on success, else the holder of each item that could not be taken.
        """
        try:
            with self.session() as s:
                holders = {vm: h for vm, o in sorted(owners.items()) if (h := _take(s, vm, o))}
                if holders:
                    raise ItemTaken(holders)
        except ItemTaken as taken:
            return taken.holders
        return {}

    def claim_item(self, *, vm: str, claimant: str) -> bool:
        """Ask the pass owning ``vm`` to stop and hand the item to ``claimant``.

        True when the claim is placed (a pass owns the item and nobody else
        claimed it). The pass's release makes ``claimant`` the owner.
        """
        with self.session() as s:
            result = s.execute(
                update(ItemRow)
                .where(
                    ItemRow.vm == vm,
                    ItemRow.owner.startswith(PASS_PREFIX),
                    or_(ItemRow.claim.is_(None), ItemRow.claim == claimant),
                )
                .values(claim=claimant)
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def withdraw_claim(self, *, vm: str, claimant: str) -> None:
        """Take back a claim that was not honoured (no-op once handed over)."""
        with self.session() as s:
            s.execute(
                update(ItemRow)
                .where(ItemRow.vm == vm, ItemRow.claim == claimant)
                .values(claim=None)
            )

    def release_item(self, *, vm: str, owner: str) -> bool:
        """Release the item if ``owner`` holds it; a pending claimant becomes the owner.

        Idempotent: False (nothing changes) when ``owner`` does not hold it.
        """
        with self.session() as s:
            result = s.execute(
                update(ItemRow)
                .where(ItemRow.vm == vm, ItemRow.owner == owner)
                .values(owner=ItemRow.claim, claim=None, owner_since=utcnow())
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def item_owner(self, *, vm: str) -> tuple[str | None, str | None]:
        """The item's owner and pending claimant (ItemNotFound when there is no item)."""
        with self.session() as s:
            row = s.execute(select(ItemRow.owner, ItemRow.claim).where(ItemRow.vm == vm)).first()
            if row is None:
                raise ItemNotFound(name=vm)
            return row[0], row[1]

    def release_stale_owners(self, *, live_jobs: Iterable[str] = ()) -> list[str]:
        """At engine start: free items held by passes (they die with the process)
        and by jobs that finished or never existed. Returns the items freed."""
        live = set(live_jobs)
        freed = []
        with self.session() as s:
            rows = s.scalars(select(ItemRow).where(ItemRow.owner.is_not(None))).all()
            for row in rows:
                owner = str(row.owner)
                if owner in live or not _stale(s, owner):
                    continue
                row.owner, row.claim, row.owner_since = None, None, utcnow()
                freed.append(row.vm)
        return freed


def _take(s: Session, vm: str, owner: str) -> str | None:
    result = s.execute(
        update(ItemRow)
        .where(ItemRow.vm == vm, or_(ItemRow.owner.is_(None), ItemRow.owner == owner))
        .values(owner=owner, owner_since=utcnow())
    )
    if result.rowcount:  # type: ignore[attr-defined]
        return None
    holder = s.execute(select(ItemRow.owner).where(ItemRow.vm == vm)).scalar_one_or_none()
    if holder is None and s.get(ItemRow, vm) is None:
        raise ItemNotFound(name=vm)
    return str(holder)


def _stale(s: Session, owner: str) -> bool:
    if not is_job(owner):
        return True  # a pass or a synchronous operation of a process that is gone
    state = s.execute(select(JobRow.state).where(JobRow.id == owner)).scalar_one_or_none()
    return state is None or state in TERMINAL_JOB_STATES
