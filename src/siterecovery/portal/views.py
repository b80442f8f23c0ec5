"""What the portal shows, as pure functions of the service layer's documents.

Which operation a row offers comes from the item's ``allowed_operations``
(the lifecycle's :data:`~siterecovery.domain.lifecycle.ALLOWED`, read by
``services.protection.item_view``): this module only orders and labels them.
A recovery plan offers what every one of its protected VMs allows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.lifecycle import Operation
from siterecovery.domain.values import format_size

Doc = Mapping[str, Any]
HEALTHS = ("healthy", "warning", "critical", "none")
HEALTH_WORDS = {"none": "not replicating"}  # a failed-over or committed item has no health
NONE = "\N{EN DASH}"  # what a table cell shows for no value


@dataclass(frozen=True, slots=True)
class Action:
    """One entry of an item's action menu: a dialog to open (GET) or a POST."""

    operation: str
    label: str
    href: str
    post: bool


# The menu's order and words (the seeds' names); which entries show is the lifecycle's.
MENU: tuple[tuple[Operation, str], ...] = (
    (Operation.TEST_FAILOVER, "Test failover"),
    (Operation.CLEANUP_TEST, "Clean up test failover"),
    (Operation.PLANNED_FAILOVER, "Planned failover"),
    (Operation.UNPLANNED_FAILOVER, "Failover"),
    (Operation.COMPLETE, "Complete failover"),
    (Operation.COMMIT, "Commit"),
    (Operation.REPROTECT, "Reverse replicate"),
    (Operation.DISABLE, "Disable replication"),
    (Operation.PROTECT, "Enable replication"),
)
DIALOG_TYPES = {
    Operation.TEST_FAILOVER: "test",
    Operation.PLANNED_FAILOVER: "planned",
    Operation.UNPLANNED_FAILOVER: "unplanned",
}
TYPE_TITLES = {"test": "Test failover", "planned": "Planned failover", "unplanned": "Failover"}


def item_actions(item: Doc) -> list[Action]:
    """The operations the item's state allows, in menu order, each with its target."""
    allowed = set(item.get("allowed_operations") or ())
    return [
        action
        for operation, label in MENU
        if operation.value in allowed
        for action in _action(item, operation, label)
    ]


def _action(item: Doc, operation: Operation, label: str) -> list[Action]:
    vm = item["vm"]
    if operation in DIALOG_TYPES:
        href = f"/items/{vm}/failover?type={DIALOG_TYPES[operation]}"
        return [Action(operation.value, label, href, post=False)]
    if operation is Operation.CLEANUP_TEST:
        return (
            [Action(operation.value, label, f"/items/{vm}/cleanup-test", True)]
            if item.get("drill")
            else []
        )
    if operation is Operation.COMPLETE:
        job = item.get("busy_job")
        return [Action(operation.value, label, f"/jobs/{job}", post=False)] if job else []
    if operation is Operation.PROTECT:
        return [Action(operation.value, label, f"/items?vm={vm}#enable", post=False)]
    return [Action(operation.value, label, f"/items/{vm}/{operation.value}", post=True)]


# The data-sync options of a failback, with the seed's explanation of each.
SYNC_OPTIONS: tuple[dict[str, Any], ...] = (
    {
        "value": "delta",
        "label": "Synchronize data before failover (synchronize delta changes only)",
        "explanation": "This option minimizes downtime: the VMs are synchronized "
        "without being shut down.",
        "phases": (
            "Phase 1: takes a snapshot of the VM at the recovery site and copies it to "
            "the on-premises host. The VM keeps running at the recovery site.",
            "Phase 2 (Complete failover): shuts the VM down at the recovery site so that no "
            "new changes occur. The final set of delta changes is transferred to the "
            "on-premises server and the on-premises VM is started.",
        ),
    },
    {
        "value": "full",
        "label": "Synchronize data during failover only (full download)",
        "explanation": "This option is faster because it assumes most of the disk has "
        "changed and does not spend time calculating checksums. It computes no checksum: "
        "it downloads the disk.",
        "phases": (
            "Recommended if the VM has been running at the recovery site for a while "
            "(a month or more), or if the on-premises VM was deleted.",
        ),
    },
)

POINT_CHOICES: tuple[tuple[str, str], ...] = (
    ("latest", "Latest (the most recent point)"),
    ("latest-processed", "Latest processed (lowest RTO)"),
    ("latest-app-consistent", "Latest app-consistent"),
)


def dialog_direction(item: Doc, kind: str, recovery_site: str) -> tuple[str, str]:
    """Source and target sites a dialog shows before the preview says it exactly."""
    target = recovery_site if kind == "unplanned-failover" else str(item["standby_site"])
    pair = {str(item["active_site"]), str(item["standby_site"])}
    source = next(iter(pair - {target}), str(item["active_site"]))
    return source, target


def key_choices(item: Doc, keys: Sequence[Doc]) -> list[Doc]:
    """The keys a failback dialog offers: only the one the item's replicas are
    encrypted with. Replicas are not encrypted yet (an item has no ``key``, and
    the service refuses any key), so today the dialog offers none."""
    return [key for key in keys if item.get("key") is not None and key["name"] == item["key"]]


# Recovery plans --------------------------------------------------------------

# A plan's operations, in the item menu's order and words; the dialog's URL is the value.
PLAN_MENU: tuple[Operation, ...] = (
    Operation.TEST_FAILOVER,
    Operation.CLEANUP_TEST,
    Operation.PLANNED_FAILOVER,
    Operation.UNPLANNED_FAILOVER,
    Operation.COMMIT,
    Operation.REPROTECT,
)
LABELS = dict(MENU)
POINT_OPERATIONS = frozenset({Operation.TEST_FAILOVER, Operation.UNPLANNED_FAILOVER})
FAILBACK_STATES = frozenset({"committed", "inconsistent"})  # services.plans._is_failback


@dataclass(frozen=True, slots=True)
class PlanOperation:
    """One operation of a plan's dialog: what it asks for besides the confirmation."""

    operation: Operation
    label: str
    href: str
    points: bool  # a point selector (latest, latest processed, latest app-consistent)
    sync: bool  # the failback's data-sync choice (delta or full)

    @property
    def failover_type(self) -> str | None:
        """The ``type`` of ``plans.failover`` (None: commit, reprotect, cleanup-test)."""
        return DIALOG_TYPES.get(self.operation)


def plan_operation(plan: str, operation: str, members: Sequence[Doc]) -> PlanOperation:
    """The dialog of ``operation`` on ``plan`` whose protected VMs are ``members``."""
    names = [o.value for o in PLAN_MENU]
    if operation not in names:
        raise InvalidInput(field="operation", reason=f"'{operation}' is not one of {names}")
    chosen = Operation(operation)
    failback = chosen is Operation.PLANNED_FAILOVER and any(
        m.get("state") in FAILBACK_STATES for m in members
    )
    return PlanOperation(
        operation=chosen,
        label="Failback" if failback else LABELS[chosen],
        href=f"/plans/{plan}/operations/{chosen.value}",
        points=chosen in POINT_OPERATIONS,
        sync=failback,
    )


def plan_operations(plan: str, members: Sequence[Doc]) -> list[PlanOperation]:
    """What the plan offers: the operations every protected VM's state allows (a VM
    never protected allows nothing yet, and the plan's own rule refuses it by name
    when clicked), in menu order; a cleanup only when a test failover left a drill."""
    if not members:
        return []
    allowed = set.intersection(*(set(m.get("allowed_operations") or ()) for m in members))
    drill = any(m.get("drill") for m in members)
    return [
        plan_operation(plan, operation.value, members)
        for operation in PLAN_MENU
        if operation.value in allowed and (operation is not Operation.CLEANUP_TEST or drill)
    ]


def plan_jobs(jobs: Sequence[Doc], plan: str) -> list[Doc]:
    """The parent jobs of ``plan`` (newest first, like ``jobs``)."""
    return [j for j in jobs if (j.get("params") or {}).get("plan") == plan]


def child_jobs(job: Doc) -> list[dict[str, Any]]:
    """A plan job's children in boot order: group, VM, kind and job id of each."""
    groups = (job.get("params") or {}).get("groups") or ()
    ordered = [
        {"group": g["group"], "vm": c["vm"], "kind": c["kind"], "job": c["job"]}
        for g in groups
        for c in g["vms"]
    ]
    children = (job.get("result") or {}).get("children") or {}
    known = {c["job"] for c in ordered}
    extra = [
        {"group": None, "vm": vm, "kind": None, "job": child}
        for vm, child in children.items()
        if child not in known
    ]
    return ordered + extra


def directions(members: Sequence[Doc]) -> list[str]:
    """The distinct replication directions of a plan's protected VMs."""
    return list(dict.fromkeys(str(m["direction"]).replace(" -> ", " → ") for m in members))


# Overview figures ------------------------------------------------------------


def health_counts(items: Sequence[Doc]) -> dict[str, int]:
    counted = Counter(str(i.get("health") or "none") for i in items)
    return {health: counted.get(health, 0) for health in HEALTHS}


def worst_rpo(items: Sequence[Doc]) -> float | None:
    """The largest RPO among protected items (None when none has a point)."""
    rpos = [float(i["rpo_seconds"]) for i in items if i.get("rpo_seconds") is not None]
    return max(rpos) if rpos else None


def running_jobs(jobs: Sequence[Doc]) -> list[Doc]:
    finished = {"succeeded", "failed", "cancelled"}
    return [j for j in jobs if j.get("state") not in finished]


# Recovery-point timeline -----------------------------------------------------


def timeline(points: Sequence[Doc], now: datetime | None = None) -> list[dict[str, Any]]:
    """Each point with its position (0–100 %) between the oldest point and now."""
    if not points:
        return []
    moments = [parse_time(p["time"]) for p in points]
    start, end = min(moments), max([*moments, now or datetime.now(UTC)])
    span = (end - start).total_seconds() or 1.0
    return [
        {**p, "left": round(100.0 * (moment - start).total_seconds() / span, 2)}
        for p, moment in zip(points, moments, strict=True)
    ]


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# Formats ---------------------------------------------------------------------


def human_bytes(count: float | None) -> str:
    return NONE if count is None else format_size(count)


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def human_rate(rate: float | None) -> str:
    return f"{human_bytes(rate)}/s" if rate else NONE


def human_time(value: str | None) -> str:
    """An ISO 8601 instant as ``2024-05-01 10:20:30 UTC``."""
    if not value:
        return NONE
    return parse_time(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def brief(detail: Any, *, pairs: int = 16, width: int = 24) -> str:
    """A step's detail on a few lines: nested keys dotted (``disks.d0.mode=tracked``),
    byte counts human, long values cut; at most ``pairs`` of them."""
    found = list(_flatten("", detail))
    shown = [f"{key}={_short(key, value, width)}" for key, value in found[:pairs]]
    return ", ".join(shown) + (", …" if len(found) > pairs else "")


def _flatten(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), inner)
    elif prefix:
        yield prefix, value


def _short(key: str, value: Any, width: int) -> str:
    if "bytes" in key and isinstance(value, int) and not isinstance(value, bool):
        return human_bytes(value)
    if isinstance(value, float):
        value = round(value, 3)
    text = NONE if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def percent(done: int, total: int) -> int:
    return min(100, 100 * done // total) if total > 0 else 0
