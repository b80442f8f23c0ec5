"""The vault repository: keyword-only data access returning domain objects.

One :class:`VaultStore` per process, thread-safe (a session per call). SQLite
runs in WAL mode with a busy timeout so the API, the job workers and the
replication scheduler can write concurrently. SQLAlchemy errors are translated
here, once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, delete, event, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from siterecovery.domain.errors import (
    AlreadyExists,
    HostNotFound,
    InternalError,
    ItemNotFound,
    JobNotFound,
    SiteNotFound,
    SiteRecoveryError,
    VmNotFound,
)
from siterecovery.domain.lifecycle import ItemState
from siterecovery.domain.model import (
    DiskDef,
    Host,
    Item,
    Job,
    JobState,
    JobStep,
    OsType,
    PointType,
    Policy,
    RecoveryPoint,
    Site,
    SiteRole,
    Vm,
    utcnow,
)
from siterecovery.domain.tracking import ItemTracking
from siterecovery.store.owner_repo import OwnerRepo
from siterecovery.store.recovery_repo import RecoveryRepo
from siterecovery.store.schema import (
    HostRow,
    ItemRow,
    JobRow,
    JobStepRow,
    PointRow,
    SiteRow,
    VmRow,
)

MIGRATIONS = Path(__file__).parent / "migrations"


TrackingChange = Callable[[ItemTracking], ItemTracking]
"""A change of an item's tracking: ``lambda t: replace(t, field=…)``."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # SQLAlchemy, not pysqlite, begins transactions
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # Take the write lock up front: read-modify-write of JSON columns from
    # concurrent threads and processes never loses an update.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def upgrade_schema(engine: Engine) -> None:
    """Bring the vault schema to the newest Alembic revision (idempotent)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class VaultStore(RecoveryRepo, OwnerRepo):
    """Data access for sites, hosts, VMs, items, points and jobs (groups and plans:
    :class:`RecoveryRepo`; item ownership: :class:`OwnerRepo`)."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if migrate:
            upgrade_schema(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error."""
        try:
            with self._sessions() as s, s.begin():
                yield s
        except SiteRecoveryError:
            raise
        except IntegrityError as exc:
            raise AlreadyExists(kind="record", name=str(exc.params)) from exc
        except SQLAlchemyError as exc:
            raise InternalError(detail=f"vault database error: {exc}") from exc

    # Sites and hosts.

    def add_site(self, *, site: Site) -> Site:
        with self.session() as s:
            if s.get(SiteRow, site.name):
                raise AlreadyExists(kind="site", name=site.name)
            s.add(SiteRow(name=site.name, provider=site.provider, path=site.path, role=site.role,
                          max_rate=site.max_rate))  # fmt: skip
        return site

    def update_site(self, *, name: str, max_rate: int) -> Site:
        """Set the site's sending cap (bytes/s, 0: none); SiteNotFound when missing."""
        with self.session() as s:
            row = s.get(SiteRow, name, with_for_update=True)
            if row is None:
                raise SiteNotFound(name=name)
            row.max_rate = max_rate
            return _site(row)

    def get_site(self, *, name: str) -> Site:
        with self.session() as s:
            row = s.get(SiteRow, name)
            if row is None:
                raise SiteNotFound(name=name)
            return _site(row)

    def list_sites(self) -> list[Site]:
        with self.session() as s:
            return [_site(r) for r in s.scalars(select(SiteRow).order_by(SiteRow.name))]

    def add_host(self, *, host: Host) -> Host:
        with self.session() as s:
            if s.get(SiteRow, host.site) is None:
                raise SiteNotFound(name=host.site)
            if s.get(HostRow, host.name):
                raise AlreadyExists(kind="host", name=host.name)
            s.add(
                HostRow(
                    name=host.name,
                    site=host.site,
                    switches=list(host.switches),
                    connected=host.connected,
                    kind=host.kind,
                    uri=host.uri,
                )
            )
        return host

    def get_host(self, *, name: str) -> Host:
        with self.session() as s:
            row = s.get(HostRow, name)
            if row is None:
                raise HostNotFound(name=name)
            return _host(row)

    def update_host(
        self,
        *,
        name: str,
        connected: bool | None = None,
        change_switches: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None,
    ) -> Host:
        """Set ``connected`` (None: kept) and the switches to ``change_switches(the
        current ones)``, under the row's lock: two changes at once compose."""
        with self.session() as s:
            row = s.get(HostRow, name, with_for_update=True)
            if row is None:
                raise HostNotFound(name=name)
            if connected is not None:
                row.connected = connected
            if change_switches is not None:
                row.switches = list(change_switches(tuple(row.switches)))
            return _host(row)

    def list_hosts(self, *, site: str | None = None) -> list[Host]:
        query = select(HostRow).order_by(HostRow.site, HostRow.name)
        if site is not None:
            query = query.where(HostRow.site == site)
        with self.session() as s:
            return [_host(r) for r in s.scalars(query)]

    # VMs.

    def add_vm(self, *, vm: Vm) -> Vm:
        with self.session() as s:
            if s.get(VmRow, (vm.name, vm.site)):
                raise AlreadyExists(kind="VM", name=f"{vm.name}@{vm.site}")
            s.add(_vm_row(vm))
        return vm

    def delete_vm(self, *, name: str, site: str, tracking: TrackingChange | None = None) -> None:
        """Forget the VM; with ``tracking``, change the tracking of the item of
        the same name in the same transaction (the VM's disk became the item's)."""
        with self.session() as s:
            if tracking is not None:
                _change_tracking(s, name, tracking)
            s.execute(delete(VmRow).where(VmRow.name == name, VmRow.site == site))

    def find_vms(self, *, name: str | None = None, site: str | None = None) -> list[Vm]:
        query = select(VmRow).order_by(VmRow.name, VmRow.site)
        if name is not None:
            query = query.where(VmRow.name == name)
        if site is not None:
            query = query.where(VmRow.site == site)
        with self.session() as s:
            return [_vm(r) for r in s.scalars(query)]

    def get_vm(self, *, name: str, site: str | None = None) -> Vm:
        """The VM ``name`` (at ``site``; without a site the name must be unambiguous)."""
        found = self.find_vms(name=name, site=site)
        if not found:
            raise VmNotFound(name=name, site=site)
        if len(found) > 1:
            from siterecovery.domain.errors import InvalidInput

            sites = ", ".join(v.site for v in found)
            raise InvalidInput(field="site", reason=f"VM '{name}' exists at {sites}; pass --site")
        return found[0]

    # Replicated items.

    def add_item(self, *, item: Item, owner: str | None = None) -> Item:
        """Insert an item, owned from its first instant by ``owner`` if given."""
        with self.session() as s:
            if s.get(ItemRow, item.vm):
                raise AlreadyExists(kind="replicated item", name=item.vm)
            s.add(
                ItemRow(
                    vm=item.vm,
                    active_site=item.active_site,
                    standby_site=item.standby_site,
                    state=item.state.value,
                    policy=item.policy.to_dict(),
                    created=item.created,
                    last_error=item.last_error,
                    cycles=item.cycles,
                    last_cycle=item.last_cycle,
                    tracking=ItemTracking().to_json(),
                    owner=owner,
                    owner_since=utcnow() if owner else None,
                )
            )
        return item

    def find_item(self, *, vm: str) -> Item | None:
        with self.session() as s:
            row = s.get(ItemRow, vm)
            return _item(row) if row else None

    def get_item(self, *, vm: str) -> Item:
        item = self.find_item(vm=vm)
        if item is None:
            raise ItemNotFound(name=vm, vm_exists=bool(self.find_vms(name=vm)))
        return item

    def list_items(self) -> list[Item]:
        with self.session() as s:
            return [_item(r) for r in s.scalars(select(ItemRow).order_by(ItemRow.vm))]

    def update_item(self, *, vm: str, **changes: Any) -> Item:
        """Set columns of an item; ``state`` and ``policy`` accept domain values."""
        with self.session() as s:
            row = s.get(ItemRow, vm, with_for_update=True)
            if row is None:
                raise ItemNotFound(name=vm)
            for key, value in changes.items():
                setattr(row, key, _column_value(value))
            return _item(row)

    def item_tracking(self, *, vm: str) -> ItemTracking:
        """What the item remembers (checkpoints, sync progress, failover…);
        ItemNotFound when there is no item."""
        with self.session() as s:
            row = s.get(ItemRow, vm)
            if row is None:
                raise ItemNotFound(name=vm)
            return ItemTracking.from_json(row.tracking)

    def update_item_tracking(self, *, vm: str, change: TrackingChange) -> ItemTracking:
        """Read, ``change`` and write the item's tracking in one transaction under
        the row's write lock (``FOR UPDATE``; SQLite's is the database's), so
        concurrent updates, of the same field or others, all survive. ``change``
        is called once, with the lock held: no I/O in it, and what it raises
        leaves the row as it was. Typically ``lambda t: replace(t, field=…)``
        (mypy checks the names; a wrong one is a TypeError). Returns the new state.
        """
        with self.session() as s:
            return _change_tracking(s, vm, change)

    def delete_item(self, *, vm: str) -> None:
        with self.session() as s:
            s.execute(delete(ItemRow).where(ItemRow.vm == vm))

    # Recovery points.

    def next_point_seq(self, *, vm: str) -> int:
        """The number of the item's next point: its tracking's ``next_seq``, or
        past its newest recorded point if that is further (a vault written by a
        version that recorded the two apart)."""
        with self.session() as s:
            row = s.get(ItemRow, vm)
            if row is None:
                raise ItemNotFound(name=vm)
            newest = s.scalar(select(func.max(PointRow.seq)).where(PointRow.vm == vm))
            return max(ItemTracking.from_json(row.tracking).next_seq, (newest or 0) + 1)

    def add_point(self, *, point: RecoveryPoint, tracking: TrackingChange) -> RecoveryPoint:
        """Record ``point`` and change its item's tracking (at least its
        ``next_seq``) in one transaction: a crash leaves both or neither, so a
        number is never given to a second point."""
        with self.session() as s:
            _change_tracking(s, point.vm, tracking)
            s.add(
                PointRow(
                    id=point.id,
                    vm=point.vm,
                    site=point.site,
                    seq=point.seq,
                    time=point.time,
                    type=point.type.value,
                    files=dict(point.files),
                    bytes=point.bytes,
                    source_digests=dict(point.source_digests),
                    workload_seq=point.workload_seq,
                    common=point.common,
                )
            )
        return point

    def list_points(self, *, vm: str, site: str | None = None) -> list[RecoveryPoint]:
        """Points of ``vm``, oldest first."""
        query = select(PointRow).where(PointRow.vm == vm).order_by(PointRow.seq)
        if site is not None:
            query = query.where(PointRow.site == site)
        with self.session() as s:
            return [_point(r) for r in s.scalars(query)]

    def update_point_files(self, *, point_id: str, files: dict[str, str]) -> None:
        with self.session() as s:
            row = s.get(PointRow, point_id)
            if row is not None:
                row.files = dict(files)

    def delete_points(self, *, ids: Sequence[str]) -> None:
        with self.session() as s:
            s.execute(delete(PointRow).where(PointRow.id.in_(list(ids))))

    # Jobs.

    def add_job(self, *, job: Job) -> Job:
        with self.session() as s:
            s.add(
                JobRow(
                    id=job.id,
                    kind=job.kind,
                    vm=job.vm,
                    state=job.state.value,
                    created=job.created,
                    updated=job.updated,
                    params=job.params,
                    result={},
                    bytes_done=0,
                    bytes_total=0,
                    rate=0.0,
                    cancel_requested=False,
                )
            )
        return job

    def get_job(self, *, job_id: str) -> Job:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise JobNotFound(name=job_id)
            return _job(row, _steps(s, job_id))

    def list_jobs(self, *, vm: str | None = None, limit: int = 100) -> list[Job]:
        query = select(JobRow).order_by(JobRow.created.desc()).limit(limit)
        if vm is not None:
            query = query.where(JobRow.vm == vm)
        with self.session() as s:
            return [_job(r, ()) for r in s.scalars(query)]

    def update_job(self, *, job_id: str, **changes: Any) -> None:
        with self.session() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise JobNotFound(name=job_id)
            for key, value in changes.items():
                setattr(row, key, _column_value(value))
            row.updated = utcnow()

    def merge_job_result(self, *, job_id: str, **values: Any) -> None:
        with self.session() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise JobNotFound(name=job_id)
            row.result = {**(row.result or {}), **values}
            row.updated = utcnow()

    def cancel_requested(self, *, job_id: str) -> bool:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            return bool(row and row.cancel_requested)

    def record_step(
        self,
        *,
        job_id: str,
        name: str,
        state: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Create or update a job step; ``started``/``finished`` follow ``state``."""
        now = utcnow()
        with self.session() as s:
            s.get(JobRow, job_id, with_for_update=True)  # serialises step numbering
            row = s.get(JobStepRow, (job_id, name))
            if row is None:
                count = len(list(s.scalars(select(JobStepRow).where(JobStepRow.job_id == job_id))))
                row = JobStepRow(job_id=job_id, name=name, idx=count, state=state, detail={})
                s.add(row)
            if state == "running" and row.started is None:
                row.started = now
            if state in ("succeeded", "failed", "cancelled", "skipped"):
                row.started = row.started or now
                row.finished = now
            row.state = state
            if detail:
                row.detail = {**(row.detail or {}), **detail}


def _change_tracking(s: Session, vm: str, change: TrackingChange) -> ItemTracking:
    """Apply ``change`` to ``vm``'s tracking under the row's write lock."""
    row = s.get(ItemRow, vm, with_for_update=True)
    if row is None:
        raise ItemNotFound(name=vm)
    changed = change(ItemTracking.from_json(row.tracking))
    row.tracking = changed.to_json()
    return changed


def _column_value(value: Any) -> Any:
    if isinstance(value, Policy):
        return value.to_dict()
    if hasattr(value, "value") and not isinstance(value, dict | datetime):
        return value.value
    return value


def _site(row: SiteRow) -> Site:
    return Site(name=row.name, provider=row.provider, path=row.path, role=SiteRole(row.role),
                max_rate=int(row.max_rate or 0))  # fmt: skip


def _host(row: HostRow) -> Host:
    return Host(
        site=row.site,
        name=row.name,
        switches=tuple(row.switches),
        connected=row.connected,
        kind=row.kind,
        uri=row.uri,
    )


def _vm_row(vm: Vm) -> VmRow:
    return VmRow(
        name=vm.name,
        site=vm.site,
        host=vm.host,
        os=vm.os.value,
        cpus=vm.cpus,
        memory_mib=vm.memory_mib,
        nics=list(vm.nics),
        disks=[d.to_dict() for d in vm.disks],
        workload=vm.workload,
        workload_link=vm.workload_link,
        nic_models=list(vm.nic_models),
    )


def _vm(row: VmRow) -> Vm:
    return Vm(
        name=row.name,
        site=row.site,
        host=row.host,
        os=OsType(row.os),
        disks=tuple(
            DiskDef(name=d["name"], size=int(d["size"]), bus=d.get("bus", "virtio"))
            for d in row.disks
        ),
        nics=tuple(row.nics),
        cpus=row.cpus,
        memory_mib=row.memory_mib,
        workload=row.workload,
        workload_link=row.workload_link,
        nic_models=tuple(row.nic_models or ()),
    )


def _item(row: ItemRow) -> Item:
    return Item(
        vm=row.vm,
        active_site=row.active_site,
        standby_site=row.standby_site,
        state=ItemState(row.state),
        policy=Policy(**row.policy),
        created=row.created,
        last_error=row.last_error,
        cycles=row.cycles,
        last_cycle=row.last_cycle,
    )


def _point(row: PointRow) -> RecoveryPoint:
    return RecoveryPoint(
        id=row.id,
        vm=row.vm,
        site=row.site,
        seq=row.seq,
        time=row.time,
        type=PointType(row.type),
        files=dict(row.files),
        bytes=row.bytes,
        source_digests=dict(row.source_digests or {}),
        workload_seq=row.workload_seq,
        common=row.common,
    )


def _steps(s: Session, job_id: str) -> tuple[JobStep, ...]:
    rows = s.scalars(select(JobStepRow).where(JobStepRow.job_id == job_id).order_by(JobStepRow.idx))
    return tuple(
        JobStep(
            name=r.name,
            state=r.state,
            started=r.started,
            finished=r.finished,
            detail=r.detail or {},
        )
        for r in rows
    )


def _job(row: JobRow, steps: tuple[JobStep, ...]) -> Job:
    return Job(
        id=row.id,
        kind=row.kind,
        vm=row.vm,
        state=JobState(row.state),
        created=row.created,
        updated=row.updated,
        steps=steps,
        bytes_done=row.bytes_done,
        bytes_total=row.bytes_total,
        rate=row.rate,
        error=row.error,
        params=row.params or {},
        result=row.result or {},
    )
