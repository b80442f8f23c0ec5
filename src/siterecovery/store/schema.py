"""SQLAlchemy tables of the vault (SQLite by default, PostgreSQL by URL).

The schema is owned by Alembic (``store/migrations``); these ORM classes are
the one description both the migrations and the repository read. JSON columns
hold small structured values (policy, per-disk replication state, details).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: UtcDateTime()}


class SiteRow(Base):
    __tablename__ = "sites"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    provider: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(String(4096))
    role: Mapped[str] = mapped_column(String(32))
    max_rate: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """Bytes/s the site may send to other sites over all its transfers (0006)."""


class HostRow(Base):
    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(ForeignKey("sites.name"))
    switches: Mapped[list[Any]] = mapped_column(JSON)
    connected: Mapped[bool] = mapped_column(Boolean, default=True)
    kind: Mapped[str] = mapped_column(String(32), default="local")
    uri: Mapped[str | None] = mapped_column(String(512), nullable=True)


class VmRow(Base):
    __tablename__ = "vms"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(ForeignKey("sites.name"), primary_key=True)
    host: Mapped[str] = mapped_column(ForeignKey("hosts.name"))
    os: Mapped[str] = mapped_column(String(16))
    cpus: Mapped[int] = mapped_column(Integer)
    memory_mib: Mapped[int] = mapped_column(Integer)
    nics: Mapped[list[Any]] = mapped_column(JSON)
    disks: Mapped[list[Any]] = mapped_column(JSON)
    workload: Mapped[bool] = mapped_column(Boolean)
    workload_link: Mapped[str | None] = mapped_column(String(64), nullable=True)
    nic_models: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)


class ItemRow(Base):
    __tablename__ = "items"
    vm: Mapped[str] = mapped_column(String(64), primary_key=True)
    active_site: Mapped[str] = mapped_column(ForeignKey("sites.name"))
    standby_site: Mapped[str] = mapped_column(ForeignKey("sites.name"))
    state: Mapped[str] = mapped_column(String(32))
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(UtcDateTime())
    last_error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    cycles: Mapped[int] = mapped_column(Integer, default=0)
    last_cycle: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    tracking: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    owner: Mapped[str | None] = mapped_column(String(80), nullable=True)
    """Who owns the item: a job id, or ``pass:TAG`` for a replication pass (0004)."""
    owner_since: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    claim: Mapped[str | None] = mapped_column(String(80), nullable=True)
    """Who takes the item over when the pass owning it stops (it stops at its next chunk)."""


class PointRow(Base):
    __tablename__ = "points"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    vm: Mapped[str] = mapped_column(String(64), index=True)
    site: Mapped[str] = mapped_column(ForeignKey("sites.name"))
    seq: Mapped[int] = mapped_column(Integer)
    time: Mapped[datetime] = mapped_column(UtcDateTime())
    type: Mapped[str] = mapped_column(String(32))
    files: Mapped[dict[str, Any]] = mapped_column(JSON)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    source_digests: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    workload_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    common: Mapped[str | None] = mapped_column(String(80), nullable=True, index=True)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    vm: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(32))
    created: Mapped[datetime] = mapped_column(UtcDateTime())
    updated: Mapped[datetime] = mapped_column(UtcDateTime())
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    rate: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)


class JobStepRow(Base):
    __tablename__ = "job_steps"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(32))
    started: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    finished: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class GroupRow(Base):
    __tablename__ = "groups"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    members: Mapped[list[Any]] = mapped_column(JSON)
    created: Mapped[datetime] = mapped_column(UtcDateTime())
    common_interval: Mapped[float] = mapped_column(Float, default=300.0)
    next_seq: Mapped[int] = mapped_column(Integer, default=1)
    last_common: Mapped[datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class PlanRow(Base):
    __tablename__ = "plans"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created: Mapped[datetime] = mapped_column(UtcDateTime())
    description: Mapped[str] = mapped_column(String(1024), default="")
    groups: Mapped[list[Any]] = mapped_column(JSON)
