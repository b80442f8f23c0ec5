"""What a replicated item remembers between operations: the ``items.tracking`` column.

:class:`ItemTracking` is the whole of it, and this module is the only one that
reads or writes its JSON (``store/repo.py`` calls :meth:`ItemTracking.from_json`
and :meth:`ItemTracking.to_json`; everyone else sees attributes). The document::

    {"schema": 2, "home": SITE, "hosts": {SITE: HOST}, "kinds": {SITE: KIND},
     "next_seq": N, "last_pass": {DISK: REPORT}, "last_quiesce": OUTCOME,
     "last_checkpoint": {"point", "tag", "site"},
     "resume": {"tag", "offsets": {DISK: BYTES}},
     "pending_merges": [{"site", "disk", "child", "parent", "grandchild"}],
     "failover": {"kind", "to", "came_from", "point", "host",
                  "source_checkpoint", "target_checkpoint"},
     "failback_tags": {PHASE: TAG}, "drill": {"vm", "site", "point", "job"},
     "pinned": [POINT]}

A field at its default (None, empty, ``next_seq`` 1) is not written: absent,
null and empty always meant the same. Compatibility:

- a document without ``schema`` is schema 0, what engines before the schema
  wrote: the same keys, read as they are (no migration); a pending merge of
  schema 0 may still name its chain directory (``dir``) instead of ``site`` and
  ``disk``;
- keys this module does not know (``busy``, the owning job before
  ``items.owner``) are read without complaint and dropped at the next write;
- a schema newer than :data:`SCHEMA` is refused (InternalError): an older
  engine must not rewrite, and so truncate, what a newer one wrote. Adding,
  removing or reshaping a field therefore bumps :data:`SCHEMA`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar, cast, get_args

from siterecovery.domain.errors import InternalError

SCHEMA = 2
"""The version :meth:`ItemTracking.to_json` writes; :meth:`~ItemTracking.from_json`
reads it and every older one. Schema 2 added ``last_quiesce`` (schema 1 is
read as it is: the same keys without it)."""

FailoverKind = Literal["unplanned", "planned", "failback"]

DiskReport = Mapping[str, Any]
"""One disk's report of a pass (mode, bytes, digests, ``tracking``, seconds…): the
sync engine's and the sites' shape (``SiteAgent.send_disk``), kept as it came."""


@dataclass(frozen=True, slots=True)
class LastCheckpoint:
    """The bitmap (checkpoint) started by the pass that sealed the latest point."""

    point: str
    """The id of the point that pass sealed."""
    tag: str
    """The pass's tag: its bitmap is ``sr-<tag>`` on the VM's disks."""
    site: str | None = None
    """Where those disks are: the pass's source site (None: not recorded)."""

    def to_json(self) -> dict[str, Any]:
        return {"point": self.point, "tag": self.tag, "site": self.site}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LastCheckpoint:
        return cls(
            point=_key(data, "point", "last_checkpoint"),
            tag=_key(data, "tag", "last_checkpoint"),
            site=_maybe_key(data, "site", "last_checkpoint"),
        )


@dataclass(frozen=True, slots=True)
class ResumeState:
    """Progress of a resumable sync: bytes done per disk, valid only for the view
    tagged ``tag`` (see ``replication/resume.py``)."""

    tag: str
    offsets: Mapping[str, int] = field(default_factory=dict)
    """Disk name → the contiguous watermark in bytes, flushed at the target."""

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "offsets": dict(self.offsets)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResumeState:
        offsets = _mapping(data.get("offsets"), "resume.offsets")
        return cls(
            tag=_key(data, "tag", "resume"),
            offsets={d: _count(n, f"resume.offsets.{d}") for d, n in offsets.items()},
        )


@dataclass(frozen=True, slots=True)
class PendingMerge:
    """A retention merge recorded before it starts (a crash leaves it to the next
    pass): ``child``'s file folds into ``parent``'s, ``grandchild`` is rebased."""

    site: str | None
    """The site of the chain; None in a schema-0 merge that named only its
    directory: the item's standby site."""
    disk: str
    child: str
    parent: str
    grandchild: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "disk": self.disk, "child": self.child,
                "parent": self.parent, "grandchild": self.grandchild}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PendingMerge:
        where = "pending_merges[]"
        if "disk" in data:
            site, disk = _maybe_key(data, "site", where), _key(data, "disk", where)
        else:  # schema 0, before sites were agents: the chain's directory …/VM/DISK
            site, disk = None, _key(data, "dir", where).rsplit("/", 1)[-1]
        return cls(
            site=site,
            disk=disk,
            child=_key(data, "child", where),
            parent=_key(data, "parent", where),
            grandchild=_maybe_key(data, "grandchild", where),
        )


@dataclass(frozen=True, slots=True)
class FailoverState:
    """The last failover (or failback): where the VM went, on what, and the
    checkpoints a later delta failback reads."""

    kind: FailoverKind
    to: str
    """The site the VM runs at since."""
    came_from: str
    point: str | None
    """The recovery point it started on (None: a failback, which syncs instead)."""
    host: str
    source_checkpoint: str | None
    """The bitmap started on the new VM's disks (``fo…``, ``fb…``)."""
    target_checkpoint: str | None
    """The old side's bitmap of the failover point, when the point was the
    latest (None: a delta failback compares checksums)."""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "to": self.to, "came_from": self.came_from,
                "point": self.point, "host": self.host,
                "source_checkpoint": self.source_checkpoint,
                "target_checkpoint": self.target_checkpoint}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FailoverState:
        kind = data.get("kind")
        if kind not in get_args(FailoverKind):
            raise _malformed("failover.kind", kind)
        return cls(
            kind=cast(FailoverKind, kind),
            to=_key(data, "to", "failover"),
            came_from=_key(data, "came_from", "failover"),
            point=_maybe_key(data, "point", "failover"),
            host=_key(data, "host", "failover"),
            source_checkpoint=_maybe_key(data, "source_checkpoint", "failover"),
            target_checkpoint=_maybe_key(data, "target_checkpoint", "failover"),
        )


@dataclass(frozen=True, slots=True)
class DrillState:
    """The running test failover: its VM ``vm`` at ``site`` on ``point``, made by ``job``."""

    vm: str
    site: str
    point: str
    job: str

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "site": self.site, "point": self.point, "job": self.job}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DrillState:
        return cls(
            vm=_key(data, "vm", "drill"),
            site=_key(data, "site", "drill"),
            point=_key(data, "point", "drill"),
            job=_key(data, "job", "drill"),
        )


@dataclass(frozen=True, slots=True)
class ItemTracking:
    """Everything an item remembers besides its columns (state, sites, policy, owner).

    Change it with ``dataclasses.replace`` inside
    ``VaultStore.update_item_tracking``: one transaction under the row's lock."""

    home: str | None = None
    """The site protection began at: failing over toward it is a failback."""
    hosts: Mapping[str, str] = field(default_factory=dict)
    """Site → the VM's last host there."""
    kinds: Mapping[str, str] = field(default_factory=dict)
    """Site → the hypervisor kind the VM ran on there."""
    next_seq: int = 1
    """The sequence number of the item's next recovery point (``pNNNNNN``)."""
    last_pass: Mapping[str, DiskReport] | None = None
    """Disk → its report in the latest sealed pass (shown by ``item show``)."""
    last_quiesce: str | None = None
    """Whether the guest quiesced for the latest point, or why not (``quiesced``,
    ``not-asked``, ``no-guest-agent``, ``freeze-failed: WHY``; shown by
    ``item show``: a crash-consistent point says why it is one)."""
    last_checkpoint: LastCheckpoint | None = None
    resume: ResumeState | None = None
    pending_merges: tuple[PendingMerge, ...] = ()
    failover: FailoverState | None = None
    """None while protected in the item's first direction (cleared by enable)."""
    failback_tags: Mapping[str, str] = field(default_factory=dict)
    """Phase (``p1``, ``p2``, ``fd``) → the tag of a failback's views, kept
    from a failed failback so its re-run resumes them; cleared at its switch."""
    drill: DrillState | None = None
    pinned: tuple[str, ...] = ()
    """Points a drill runs on: retention keeps them and their children's files."""

    def to_json(self) -> dict[str, Any]:
        """The column's JSON: ``schema`` and every field not at its default."""
        data: dict[str, Any] = {"schema": SCHEMA}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(_DEFAULT, f.name):
                data[f.name] = _encode(value)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ItemTracking:
        """Read any schema up to :data:`SCHEMA` (see the module doc); unknown keys
        are ignored. InternalError for a newer schema or a malformed value."""
        data = data or {}
        _check_schema(data.get("schema", 0))
        return cls(
            home=_maybe_text(data.get("home") or None, "home"),
            hosts=_text_map(data.get("hosts"), "hosts"),
            kinds=_text_map(data.get("kinds"), "kinds"),
            next_seq=_count(data.get("next_seq", 1), "next_seq"),
            last_pass=_reports(data.get("last_pass")),
            last_quiesce=_maybe_text(data.get("last_quiesce"), "last_quiesce"),
            last_checkpoint=_nested(LastCheckpoint, data, "last_checkpoint"),
            resume=_nested(ResumeState, data, "resume"),
            pending_merges=tuple(
                PendingMerge.from_json(_mapping(m, "pending_merges[]"))
                for m in _sequence(data.get("pending_merges"), "pending_merges")
            ),
            failover=_nested(FailoverState, data, "failover"),
            failback_tags=_text_map(data.get("failback_tags"), "failback_tags"),
            drill=_nested(DrillState, data, "drill"),
            pinned=tuple(_text(p, "pinned[]") for p in _sequence(data.get("pinned"), "pinned")),
        )


_DEFAULT = ItemTracking()


def _check_schema(schema: Any) -> None:
    if not isinstance(schema, int) or isinstance(schema, bool) or schema < 0:
        raise _malformed("schema", schema)
    if schema > SCHEMA:
        raise InternalError(
            detail=f"the vault's items.tracking is schema {schema}, newer than this engine "
            f"reads ({SCHEMA}): run the siterecovery that wrote it"
        )


def _encode(value: Any) -> Any:
    """A field's JSON: nested states by their ``to_json``, tuples as lists, copies."""
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, LastCheckpoint | ResumeState | PendingMerge | FailoverState | DrillState):
        return value.to_json()
    return value


_Nested = TypeVar("_Nested", LastCheckpoint, ResumeState, FailoverState, DrillState)


def _nested(kind: type[_Nested], data: Mapping[str, Any], key: str) -> _Nested | None:
    """``kind.from_json(data[key])``; None for an absent, null or empty value."""
    value = data.get(key)
    return kind.from_json(_mapping(value, key)) if value else None


def _reports(value: Any) -> Mapping[str, DiskReport] | None:
    if not value:
        return None
    reports = _mapping(value, "last_pass")
    return {disk: dict(_mapping(r, f"last_pass.{disk}")) for disk, r in reports.items()}


def _malformed(what: str, value: Any) -> InternalError:
    return InternalError(detail=f"the vault's items.tracking is malformed: {what} is {value!r}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _malformed(what, value)
    return value


def _maybe_text(value: Any, what: str) -> str | None:
    return None if value is None else _text(value, what)


def _key(data: Mapping[str, Any], key: str, where: str) -> str:
    """``data[key]``, a string (InternalError naming ``where.key`` otherwise)."""
    return _text(data.get(key), f"{where}.{key}")


def _maybe_key(data: Mapping[str, Any], key: str, where: str) -> str | None:
    return _maybe_text(data.get(key), f"{where}.{key}")


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _malformed(what, value)
    return value


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _malformed(what, value)
    return value


def _sequence(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise _malformed(what, value)
    return list(value)


def _text_map(value: Any, what: str) -> dict[str, str]:
    return {k: _text(v, f"{what}.{k}") for k, v in _mapping(value, what).items()}
