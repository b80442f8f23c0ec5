"""Output of the CLI: one JSON document, Rich tables and panels, a job progress bar.

JSON goes to stdout unformatted by Rich (no wrapping, no highlighting), so it
parses exactly. Human output escapes every value from the daemon (a VM named
``[red]`` prints as such). Errors go to stderr without --json.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
)
from rich.table import Table
from rich.text import Text

from siterecovery.domain.values import format_size

Doc = Mapping[str, Any]
Column = tuple[str, Callable[[Doc], str]]


def console(*, stderr: bool = False) -> Console:
    """A console on the current stdout (or stderr): tests may swap them."""
    return Console(stderr=stderr, highlight=False)


def print_error(error: Doc) -> None:
    """Print an error body (code, message) in red on stderr (with --json, cli/main.py
    prints the error document instead)."""
    text = Text.assemble(("error: ", "bold red"), (str(error["message"]), "red"))
    text.append(f"  ({error['code']})", style="dim")
    console(stderr=True).print(text)


def say(message: str, *, style: str = "") -> None:
    """One line for humans on stdout."""
    console().print(Text(message, style=style))


def warn(message: str) -> None:
    console(stderr=True).print(Text(message, style="yellow"))


# -- values ------------------------------------------------------------------


def human_bytes(count: float | None) -> str:
    return "-" if count is None else format_size(count)


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def value_text(value: Any) -> str:
    """A JSON value on one line: lists of scalars joined, structures as compact JSON."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "))
    return str(value)


def brief(value: Any) -> str:
    """A mapping on one short line: scalars as ``k=v``, structures as ``k={…}``."""
    if not isinstance(value, dict):
        return value_text(value)
    return ", ".join(f"{k}={_scalar(v)}" for k, v in value.items()) or "-"


def _scalar(value: Any) -> str:
    if isinstance(value, dict):
        return "{…}" if value else "{}"
    if isinstance(value, list):
        return f"[{len(value)}]"
    return value_text(value)


def key(name: str, fmt: Callable[[Any], str] = value_text) -> Callable[[Doc], str]:
    return lambda doc: fmt(doc.get(name))


# -- tables and panels -----------------------------------------------------


def table(rows: Sequence[Doc], columns: Sequence[Column], *, title: str) -> Table:
    grid = Table(title=title, title_justify="left")
    for header, _ in columns:
        grid.add_column(header)
    for row in rows:
        grid.add_row(*(Text(get(row)) for _, get in columns))
    return grid


def panel(doc: Doc, fields: Sequence[Column], *, title: str) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for label, get in fields:
        grid.add_row(label.lower() if label.isupper() else label, Text(get(doc)))
    return Panel(grid, title=Text(title), title_align="left", expand=False)


def print_all(*renderables: RenderableType) -> None:
    console().print(Group(*renderables))


def lister(columns: Sequence[Column], title: str, empty: str) -> Callable[[Any], None]:
    """A human renderer of a JSON list as a table (or ``empty`` when there are no rows)."""

    def render(rows: Any) -> None:
        if rows:
            print_all(table(rows, columns, title=title))
        else:
            say(empty, style="dim")

    return render


def shower(fields: Sequence[Column], title: Callable[[Doc], str]) -> Callable[[Any], None]:
    """A human renderer of a JSON object as a key/value panel."""
    return lambda doc: print_all(panel(doc, fields, title=title(doc)))


def everything(doc: Any) -> None:
    """A key/value panel of every field of ``doc`` (for answers without a fixed shape)."""
    fields = [(name, key(name)) for name in doc]
    print_all(panel(doc, fields, title=""))


# -- resources ---------------------------------------------------------------


def disks_text(disks: Any) -> str:
    if not isinstance(disks, list):
        return value_text(disks)
    return ", ".join(f"{d.get('name')} {human_bytes(d.get('size'))}" for d in disks) or "-"


def progress_text(job: Doc) -> str:
    done, total = job.get("bytes_done") or 0, job.get("bytes_total") or 0
    if not total:
        return "-"
    return f"{human_bytes(done)} / {human_bytes(total)} ({100 * done // total}%)"


def short_progress(job: Doc) -> str:
    done, total = job.get("bytes_done") or 0, job.get("bytes_total") or 0
    return f"{100 * done // total}% of {human_bytes(total)}" if total else "-"


def time_text(value: Any) -> str:
    """An ISO 8601 instant to the second, for tables (``2024-05-01 10:20:30``)."""
    if not isinstance(value, str):
        return value_text(value)
    return value.replace("T", " ")[:19]


def clock_text(value: Any) -> str:
    """The time of day of an ISO 8601 instant (``10:20:30``)."""
    return time_text(value)[11:] if isinstance(value, str) else value_text(value)


def rate_text(rate: Any) -> str:
    return f"{human_bytes(rate)}/s" if rate else "-"


def error_text(error: Any) -> str:
    if not isinstance(error, dict):
        return value_text(error)
    return f"{error.get('code')}: {error.get('message')}"


def point_text(point: Any) -> str:
    if not isinstance(point, dict):
        return "-"
    return f"{point.get('id')} at {time_text(point.get('time'))} ({point.get('type')})"


SITE_COLUMNS: list[Column] = [
    ("NAME", key("name")),
    ("PROVIDER", key("provider")),
    ("ROLE", key("role")),
    ("PATH", key("path")),
    ("MAX RATE", key("max_rate", rate_text)),
    ("AGENT", lambda d: _agent_text(d.get("agent"))),
]


def _agent_text(agent: Any) -> str:
    """An agent site's reachability (since when), version, clock offset and when the
    daemon last checked ("" for a local site)."""
    if not agent:
        return ""
    checked = f"checked {clock_text(agent.get('checked_at'))}"
    if not agent.get("reachable"):
        since = time_text(agent.get("since"))
        return f"unreachable since {since} UTC ({agent.get('error')}), {checked}"
    offset = agent.get("clock_offset") or 0.0
    return f"up {agent.get('version')}, clock {offset:+.3f}s, {checked}"


def health_text(doc: Doc) -> str:
    """An item's health, with the site whose agent does not answer, on one line."""
    down = doc.get("site_unreachable")
    health = value_text(doc.get("health"))
    if not isinstance(down, dict):
        return health
    since = time_text(down.get("since"))
    return f"{health}: site '{down.get('site')}' unreachable since {since} UTC ({down.get('code')})"


HOST_COLUMNS: list[Column] = [
    ("SITE", key("site")),
    ("NAME", key("name")),
    ("SWITCHES", key("switches")),
    ("CONNECTED", key("connected")),
]
VM_COLUMNS: list[Column] = [
    ("NAME", key("name")),
    ("SITE", key("site")),
    ("HOST", key("host")),
    ("OS", key("os")),
    ("POWER", key("power")),
    ("DISKS", key("disks", disks_text)),
    ("NICS", key("nics")),
    ("MANAGED", key("managed")),
]
VM_FIELDS: list[Column] = [
    *(c for c in VM_COLUMNS[1:] if c[0] != "MANAGED"),
    ("cpus", key("cpus")),
    ("memory MiB", key("memory_mib")),
    ("workload", key("workload")),
    ("guest", key("guest", brief)),
]
ITEM_COLUMNS: list[Column] = [
    ("VM", key("vm")),
    ("STATE", key("state")),
    ("HEALTH", key("health")),
    ("DIRECTION", key("direction")),
    ("RPO", key("rpo_seconds", human_seconds)),
    ("POINTS", key("points")),
    ("LAST ERROR", key("last_error", error_text)),
]
ITEM_FIELDS: list[Column] = [
    ITEM_COLUMNS[1],
    ("HEALTH", health_text),
    *ITEM_COLUMNS[3:-1],
    ("latest point", key("latest_point", point_text)),
    ("latest app-consistent", key("latest_app_consistent_point", point_text)),
    ("guest quiesce", key("last_quiesce")),
    ("last error", key("last_error", error_text)),
    ("policy", key("policy", brief)),
    ("allowed operations", key("allowed_operations")),
]
POINT_COLUMNS: list[Column] = [
    ("ID", key("id")),
    ("TIME", key("time", time_text)),
    ("TYPE", key("type")),
    ("SEQ", key("seq")),
    ("BYTES", key("bytes", human_bytes)),
    ("SITE", key("site")),
]
JOB_COLUMNS: list[Column] = [
    ("ID", key("id")),
    ("KIND", key("kind")),
    ("VM", key("vm")),
    ("STATE", key("state")),
    ("PROGRESS", short_progress),
    ("UPDATED", key("updated", time_text)),
]
JOB_FIELDS: list[Column] = [
    *JOB_COLUMNS[1:-2],
    ("progress", progress_text),
    ("rate", key("rate", rate_text)),
    ("ETA", key("eta_seconds", human_seconds)),
    ("created", key("created")),
    ("updated", key("updated")),
    ("error", key("error", error_text)),
    ("params", key("params", brief)),
    ("result", key("result", brief)),
    ("allowed actions", key("allowed_actions")),
]
STEP_COLUMNS: list[Column] = [
    ("STEP", key("name")),
    ("STATE", key("state")),
    ("STARTED", key("started", clock_text)),
    ("FINISHED", key("finished", clock_text)),
    ("DETAIL", key("detail", brief)),
]

sites = lister(SITE_COLUMNS, "Sites", "no sites; add one with `siterecovery site add`")
hosts = lister(HOST_COLUMNS, "Hosts", "no hosts; add one with `siterecovery host add`")
vms = lister(VM_COLUMNS, "VMs", "no VMs; create one with `siterecovery vm create`")
items = lister(ITEM_COLUMNS, "Replicated items", "no replicated items; `siterecovery protect`")
points = lister(POINT_COLUMNS, "Recovery points", "no recovery points yet")
EXPORT_COLUMNS: list[Column] = [
    ("DISK", key("disk")),
    ("FORMAT", key("format")),
    ("FILE", key("path")),
    ("BYTES", key("bytes")),
]


def exported(doc: Any) -> None:
    """A point export: one row per file written at the point's site."""
    title = f"point {doc.get('point')} of {doc.get('vm')} at site {doc.get('site')}"
    print_all(table(doc.get("files") or [], EXPORT_COLUMNS, title=title))


jobs = lister(JOB_COLUMNS, "Jobs", "no jobs")
site = shower(SITE_COLUMNS[1:], lambda d: f"site {d.get('name')}")
host = shower(HOST_COLUMNS, lambda d: f"host {d.get('name')}")
vm = shower(VM_FIELDS, lambda d: f"VM {d.get('name')}")
item = shower(ITEM_FIELDS, lambda d: f"replicated item {d.get('vm')}")


def job(doc: Any) -> None:
    steps = doc.get("steps") or []
    parts: list[RenderableType] = [panel(doc, JOB_FIELDS, title=f"job {doc.get('id')}")]
    if steps:
        parts.append(table(steps, STEP_COLUMNS, title="Steps"))
    parts.append(Text(f"every detail: siterecovery job show {doc.get('id')} --json", style="dim"))
    print_all(*parts)


def lab(doc: Any) -> None:
    print_all(
        table(doc.get("sites") or [], SITE_COLUMNS, title="Sites"),
        table(doc.get("hosts") or [], HOST_COLUMNS, title="Hosts"),
        table(doc.get("vms") or [], VM_COLUMNS, title="VMs"),
    )


def lab_down(doc: Any) -> None:
    """What ``lab down`` stopped, and what it could not (with why)."""
    say(f"stopped: {', '.join(doc.get('stopped') or []) or 'nothing'}")
    for failed in doc.get("failed") or []:
        warn(f"not stopped: {failed['vm']}: {failed['error'].get('message', failed['error'])}")
    if doc.get("hosts_stopped"):
        say(f"lab hosts stopped: {', '.join(doc['hosts_stopped'])}")


def pass_report(doc: Any) -> None:
    """The point a replication pass sealed, then one panel per disk (sizes readable)."""
    say(f"recovery point {point_text(doc.get('point'))}", style="green")
    quiesce = doc.get("quiesce")
    if quiesce and quiesce not in ("quiesced", "not-asked"):
        warn(f"crash-consistent: {quiesce}")
    for name, detail in (doc.get("disks") or {}).items():
        fields = [(field, key(field, _size_or_value(field))) for field in detail]
        console().print(panel(detail, fields, title=f"disk {name}"))


def _size_or_value(field: str) -> Callable[[Any], str]:
    return human_bytes if field.startswith("bytes") or field.endswith("_bytes_read") else value_text


def check(doc: Any) -> None:
    fields = [(name, key(name)) for name in doc]
    good = doc.get("consistent") is True
    title = "consistent" if good else "NOT consistent"
    console().print(panel(doc, fields, title=title), style="" if good else "red")


def checks(doc: Any) -> None:
    """Several VMs checked together: each VM's check, then the links between them."""
    for report in (doc.get("vms") or {}).values():
        check(report)
    links = doc.get("links") or {}
    good = links.get("consistent") is True
    text = "links: every record depends only on records the other VMs hold"
    if not good:
        text = "links NOT consistent:\n" + "\n".join(links.get("errors") or [])
    console().print(Text(text), style="" if good else "red")


# -- job progress -------------------------------------------------------------


class RateColumn(ProgressColumn):
    """The transfer rate the daemon measured (bytes/s in ``task.fields['rate']``)."""

    def render(self, task: Task) -> Text:
        return Text(rate_text(task.fields.get("rate")), style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """The ETA the daemon computed (seconds in ``task.fields['eta']``)."""

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta")
        return Text(f"ETA {human_seconds(eta)}", style="progress.remaining")


def job_caption(doc: Doc) -> str:
    """``kind vm: now`` where now is the running step of a running job, else its state."""
    running = [s.get("name") for s in doc.get("steps") or [] if s.get("state") == "running"]
    where = running[-1] if running and doc.get("state") == "running" else doc.get("state")
    return f"{doc.get('kind')} {doc.get('vm') or ''}: {where}"


class JobProgress:
    """A progress bar fed with successive JSON documents of one job.

    Bytes done/total, the daemon's rate and ETA; the bar pulses while the
    total is unknown. A context manager: the bar stays printed after exit.
    """

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            RateColumn(),
            EtaColumn(),
            console=console(),
        )
        self._task: TaskID | None = None

    def update(self, doc: Doc) -> None:
        caption, total = job_caption(doc), doc.get("bytes_total") or None
        if self._task is None:
            self._task = self._progress.add_task(caption, total=total)
        self._progress.update(
            self._task,
            description=caption,
            total=total,
            completed=doc.get("bytes_done") or 0,
            rate=doc.get("rate"),
            eta=doc.get("eta_seconds"),
        )

    def __enter__(self) -> JobProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()
