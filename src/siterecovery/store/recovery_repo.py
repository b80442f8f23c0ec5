"""Data access for replication groups and recovery plans (mixed into VaultStore)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from siterecovery.domain.errors import AlreadyExists, GroupNotFound, PlanNotFound
from siterecovery.domain.model import RecoveryPoint
from siterecovery.domain.recovery import BootGroup, RecoveryPlan, ReplicationGroup
from siterecovery.store.schema import GroupRow, PlanRow, PointRow


class RecoveryRepo:
    """Groups and plans. Needs ``session()`` and ``list_points`` from its host class."""

    def session(self) -> AbstractContextManager[Session]:  # pragma: no cover - the host's
        raise NotImplementedError

    # Replication groups.

    def add_group(self, *, group: ReplicationGroup) -> ReplicationGroup:
        with self.session() as s:
            if s.get(GroupRow, group.name):
                raise AlreadyExists(kind="replication group", name=group.name)
            s.add(
                GroupRow(
                    name=group.name,
                    members=list(group.members),
                    created=group.created,
                    common_interval=group.common_interval,
                    next_seq=group.next_seq,
                    last_common=group.last_common,
                )
            )
        return group

    def get_group(self, *, name: str) -> ReplicationGroup:
        with self.session() as s:
            row = s.get(GroupRow, name)
            if row is None:
                raise GroupNotFound(name=name)
            return _group(row)

    def list_groups(self) -> list[ReplicationGroup]:
        with self.session() as s:
            return [_group(r) for r in s.scalars(select(GroupRow).order_by(GroupRow.name))]

    def group_of(self, *, vm: str) -> ReplicationGroup | None:
        """The group ``vm`` belongs to (a VM is in at most one)."""
        return next((g for g in self.list_groups() if vm in g.members), None)

    def update_group(self, *, name: str, **changes: Any) -> ReplicationGroup:
        """Set columns of a group (``members`` as a list); row-locked read-modify-write."""
        with self.session() as s:
            row = s.get(GroupRow, name, with_for_update=True)
            if row is None:
                raise GroupNotFound(name=name)
            for key, value in changes.items():
                setattr(row, key, list(value) if key == "members" else value)
            return _group(row)

    def take_common_seq(self, *, name: str) -> int:
        """Reserve the group's next common-point number (atomic)."""
        with self.session() as s:
            row = s.get(GroupRow, name, with_for_update=True)
            if row is None:
                raise GroupNotFound(name=name)
            seq = row.next_seq
            row.next_seq = seq + 1
            return seq

    def delete_group(self, *, name: str) -> None:
        with self.session() as s:
            s.execute(delete(GroupRow).where(GroupRow.name == name))

    def common_points(self, *, common: str) -> list[RecoveryPoint]:
        from siterecovery.store.repo import _point

        with self.session() as s:
            rows = s.scalars(select(PointRow).where(PointRow.common == common))
            return [_point(r) for r in rows]

    # Recovery plans.

    def add_plan(self, *, plan: RecoveryPlan) -> RecoveryPlan:
        with self.session() as s:
            if s.get(PlanRow, plan.name):
                raise AlreadyExists(kind="recovery plan", name=plan.name)
            s.add(_plan_row(plan))
        return plan

    def get_plan(self, *, name: str) -> RecoveryPlan:
        with self.session() as s:
            row = s.get(PlanRow, name)
            if row is None:
                raise PlanNotFound(name=name)
            return _plan(row)

    def list_plans(self) -> list[RecoveryPlan]:
        with self.session() as s:
            return [_plan(r) for r in s.scalars(select(PlanRow).order_by(PlanRow.name))]

    def save_plan(self, *, plan: RecoveryPlan) -> RecoveryPlan:
        """Replace the stored plan's groups and description."""
        with self.session() as s:
            row = s.get(PlanRow, plan.name, with_for_update=True)
            if row is None:
                raise PlanNotFound(name=plan.name)
            row.groups = [g.to_dict() for g in plan.groups]
            row.description = plan.description
            return _plan(row)

    def delete_plan(self, *, name: str) -> None:
        with self.session() as s:
            s.execute(delete(PlanRow).where(PlanRow.name == name))


def _group(row: GroupRow) -> ReplicationGroup:
    return ReplicationGroup(
        name=row.name,
        members=tuple(row.members),
        created=row.created,
        common_interval=row.common_interval,
        next_seq=row.next_seq,
        last_common=row.last_common,
    )


def _plan_row(plan: RecoveryPlan) -> PlanRow:
    return PlanRow(
        name=plan.name,
        created=plan.created,
        description=plan.description,
        groups=[g.to_dict() for g in plan.groups],
    )


def _plan(row: PlanRow) -> RecoveryPlan:
    return RecoveryPlan(
        name=row.name,
        created=row.created,
        description=row.description or "",
        groups=tuple(BootGroup.from_dict(g) for g in row.groups or []),
    )
