"""How the agent sites answer: a cache of probes, refreshed in the background.

``GET /sites``, ``site list`` and the items' health read this cache, never an
agent: behind a cut link they answer at once with what the last probe saw.
In ``siterecovery serve`` a thread probes every agent site (``GET /v1/info``
with a short timeout, the sites of a round in parallel) every ``interval``
seconds; a site never probed, or whose entry is older than ``stale_after``
(two rounds: no daemon, just after start, or a new site), is probed once when
asked for, with the same short timeout. A readiness check before an operation
(:meth:`HealthMonitor.require`) probes afresh and records what it saw.

    probe outcome                      SiteHealth
    the agent answered /v1/info        reachable, version, clock_offset, round_trip
    any error of our tree              not reachable, error = its code, message
    (AgentUnreachable: down, cut, timeout; AgentUnauthorized; AgentCertificateMismatch)

``since`` is when the current state (reachable or not) was first seen, and
``checked_at`` when the last probe ended (both ISO 8601, UTC).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from siterecovery.agent.client import AgentClient
from siterecovery.domain.errors import SiteRecoveryError

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 3.0
"""Seconds a probe waits to connect and for the answer (the client's default is 30)."""

PROBE_INTERVAL = 10.0
"""Seconds between two rounds of the daemon's probes."""

PARALLEL = 8
"""Sites probed at once in a round."""


@dataclass(frozen=True, slots=True)
class Target:
    """An agent site as the vault knows it: a new URL or certificate is a new client."""

    site: str
    url: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class SiteHealth:
    """What the last probe of one agent site saw."""

    site: str
    url: str
    fingerprint: str
    """The certificate pinned for the agent (SHA-256)."""
    reachable: bool
    since: str
    """When the current state (reachable or not) was first seen (ISO 8601, UTC)."""
    checked_at: str
    """When the last probe ended (ISO 8601, UTC)."""
    version: str = ""
    clock_offset: float | None = None
    """Agent clock minus ours (s), about ``round_trip / 2`` accurate."""
    round_trip: float | None = None
    """The probe's duration (s)."""
    error: str | None = None
    """The error's code when not reachable (``AGENT_UNREACHABLE``…)."""
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Targets = Callable[[], list[Target]]
"""The agent sites now (read at every round: sites come and go)."""

Connect = Callable[[Target, float], AgentClient]
"""A client of ``target`` with the given timeout (s); raises our error tree."""


class HealthMonitor:
    """The cache of agent sites' health and the thread that keeps it fresh.

    Thread-safe: any number of threads read the cache and probe at once. A
    probe result replaces the cached one only if the probe started later
    (a slow probe that ends last never hides a newer answer). Of concurrent
    on-demand probes of one site, one runs and the others take its answer.
    """

    def __init__(
        self,
        targets: Targets,
        connect: Connect,
        *,
        interval: float = PROBE_INTERVAL,
        timeout: float = PROBE_TIMEOUT,
        stale_after: float | None = None,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        # A running monitor's entries are at most one round old (interval + timeout).
        self.stale_after = 2 * (interval + timeout) if stale_after is None else stale_after
        self._targets = targets
        self._connect = connect
        self._lock = threading.Lock()
        self._health: dict[str, SiteHealth] = {}
        self._started: dict[str, float] = {}
        """Per site: when (monotonic) the probe behind its cached entry began."""
        self._clients: dict[Target, AgentClient] = {}
        self._probing: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # The daemon's thread -----------------------------------------------------------

    def start(self) -> None:
        """Probe every agent site now, then ``interval`` s after each round, in a thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="site-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a round in flight ends within ``timeout``) and close clients."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 10)
            self._thread = None
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # the vault unreadable for a moment: try at the next round
                log.exception("probing the agent sites failed")
            self._stop.wait(self.interval)

    def refresh(self) -> None:
        """One round: probe every agent site (in parallel); forget sites gone."""
        targets = self._targets()
        self._retire(targets)
        begun = time.monotonic()
        self._each(lambda t: self._probe_once(t, newer_than=begun), targets)

    # Readers -------------------------------------------------------------------------

    def cached(self, site: str) -> SiteHealth | None:
        """The last probe of ``site``, never probing (None: not probed yet)."""
        with self._lock:
            return self._health.get(site)

    def current(self) -> dict[str, SiteHealth]:
        """Every agent site's health: cached, probing once (in parallel) those never
        probed or stale."""
        oldest = time.monotonic() - self.stale_after
        targets = self._targets()
        found = {t.site: h for t in targets if (h := self._fresh(t.site, oldest)) is not None}
        missing = [t for t in targets if t.site not in found]
        probed = self._each(lambda t: self._probe_once(t, newer_than=oldest), missing)
        found.update((h.site, h) for h in probed)
        return {t.site: found[t.site] for t in targets}

    def probe(self, target: Target) -> SiteHealth:
        """Probe ``target`` now (``timeout`` s at most) and record what it saw."""
        return self._observe(target)[0]

    def require(self, target: Target) -> SiteHealth:
        """:meth:`probe`, raising the error the probe met (recorded first)."""
        seen, error = self._observe(target)
        if error is not None:
            raise error
        return seen

    # Inside ----------------------------------------------------------------------------

    def _observe(self, target: Target) -> tuple[SiteHealth, SiteRecoveryError | None]:
        begun = time.monotonic()
        try:
            info = self._client(target).info()
        except SiteRecoveryError as error:
            return self._record(_unreachable(target, error), begun), error
        seen = SiteHealth(
            site=target.site, url=target.url, fingerprint=target.fingerprint, reachable=True,
            since="", checked_at=_iso(time.time()), version=info.version,
            clock_offset=round(info.clock_offset, 4), round_trip=round(info.round_trip, 4),
        )  # fmt: skip
        return self._record(seen, begun), None

    def _probe_once(self, target: Target, *, newer_than: float) -> SiteHealth:
        """The cached entry if its probe began after ``newer_than``, else a probe.

        A reader never waits for a probe while the cache has an entry fresh
        enough for it; one that must probe waits for a probe in flight instead."""
        found = self._fresh(target.site, newer_than)
        if found is not None:
            return found
        with self._lock:
            guard = self._probing.setdefault(target.site, threading.Lock())
        with guard:
            return self._fresh(target.site, newer_than) or self.probe(target)

    def _fresh(self, site: str, newer_than: float) -> SiteHealth | None:
        with self._lock:
            found = self._health.get(site)
            return found if found is not None and self._started[site] >= newer_than else None

    def _record(self, seen: SiteHealth, begun: float) -> SiteHealth:
        with self._lock:
            before = self._health.get(seen.site)
            if before is not None and self._started[seen.site] > begun:
                return before  # a later probe already answered
            changed = before is None or before.reachable != seen.reachable
            since = seen.checked_at if before is None or changed else before.since
            entry = replace(seen, since=since)
            self._health[seen.site], self._started[seen.site] = entry, begun
        if changed:
            _log_change(entry, first=before is None)
        return entry

    def _client(self, target: Target) -> AgentClient:
        with self._lock:
            found = self._clients.get(target)
        if found is not None:
            return found
        made = self._connect(target, self.timeout)
        with self._lock:
            kept = self._clients.setdefault(target, made)
        if kept is not made:
            made.close()
        return kept

    def _retire(self, targets: Iterable[Target]) -> None:
        """Forget sites that are no longer agent sites; close clients of old addresses."""
        wanted = set(targets)
        sites = {t.site for t in wanted}
        with self._lock:
            gone = [t for t in self._clients if t not in wanted]
            closing = [self._clients.pop(t) for t in gone]
            for site in [s for s in self._health if s not in sites]:
                del self._health[site], self._started[site]
        for client in closing:
            client.close()

    def _each(
        self, work: Callable[[Target], SiteHealth], targets: list[Target]
    ) -> list[SiteHealth]:
        """``work`` on every target, in parallel when there are several."""
        if len(targets) <= 1:
            return [work(t) for t in targets]
        workers = min(PARALLEL, len(targets))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="site-probe") as pool:
            return list(pool.map(work, targets))


def _unreachable(target: Target, error: SiteRecoveryError) -> SiteHealth:
    return SiteHealth(
        site=target.site, url=target.url, fingerprint=target.fingerprint, reachable=False,
        since="", checked_at=_iso(time.time()), error=error.code, message=error.message,
    )  # fmt: skip


def _log_change(entry: SiteHealth, *, first: bool) -> None:
    if entry.reachable and not first:
        log.info("the agent of site '%s' at %s answers again", entry.site, entry.url)
    elif not entry.reachable:
        log.warning("site '%s': %s", entry.site, entry.message)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
