"""Sites served by an agent: joining one, and how each answers.

``site add NAME --agent https://HOST:PORT --join TOKEN`` checks the agent's
certificate against the token's pin, spends the token (it works once) and
keeps what the agent answers: its certificate (pinned from then on) and the
engine's secret, as the vault key ``agent-NAME`` (wrapped under the master key).

How each agent site answers comes from its vault's :class:`HealthMonitor`
(``sites/health.py``): the daemon starts one (:func:`start_monitor`) whose
thread probes every agent site; ``site list`` and the items read its cache.
Without a daemon's monitor, :func:`site_infos` probes once, with the short
timeout. :func:`require_reachable` probes afresh before an operation starts.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from siterecovery.agent.client import AgentClient, join
from siterecovery.context import AGENT_PROVIDER, Context
from siterecovery.domain.errors import (
    AgentUnreachable,
    AlreadyExists,
    InternalError,
    InvalidInput,
    SiteNotFound,
)
from siterecovery.domain.model import Site
from siterecovery.domain.values import check_name, parse_role
from siterecovery.keys import SecretKey
from siterecovery.keys.master import MasterKey
from siterecovery.sites.health import PROBE_INTERVAL, HealthMonitor, SiteHealth, Target
from siterecovery.store import keys as key_store
from siterecovery.store.agents import AgentRecord, add_agent, find_agent, list_agents

INTERVAL_ENV = "SITERECOVERY_AGENT_PROBE_INTERVAL"
"""Seconds between the daemon's probes of the agent sites (default 10)."""

_MONITORS: dict[Path, HealthMonitor] = {}
"""The started monitor of each vault in this process (the daemon's)."""
_MONITORS_GUARD = threading.Lock()


def add_agent_site(ctx: Context, *, name: str, url: str, token: str, role: str) -> Site:
    """Join the agent at ``url`` as site ``name`` (every check before the token is spent)."""
    check_name("name", name)
    role_value = parse_role(role)
    if not url.startswith("https://"):
        raise InvalidInput(field="agent", reason=f"'{url}' is not an https:// URL")
    if any(s.name == name for s in ctx.store.list_sites()):
        raise AlreadyExists(kind="site", name=name)
    joined = join(url, token)
    if joined.site != name:
        raise InvalidInput(
            field="name",
            reason=f"the agent at {url} serves site '{joined.site}', not '{name}' "
            f"(the token was spent: make a new one on that agent)",
        )
    site = Site(name=name, provider=AGENT_PROVIDER, path=url, role=role_value)
    key = SecretKey(f"agent-{name}", datetime.now(UTC), _secret_bytes(joined.secret))
    ctx.store.add_site(site=site)
    key_store.add_key(ctx.store, master=MasterKey(ctx.vault_dir), key=key)
    add_agent(
        ctx.store,
        record=AgentRecord(
            site=name, url=url.rstrip("/"), cert_pem=joined.cert_pem,
            fingerprint=joined.fingerprint, secret_key=key.name, joined=key.created,
        ),
    )  # fmt: skip
    ctx.site(site).prepare()
    return site


def site_infos(ctx: Context) -> dict[str, dict[str, Any]]:
    """Per agent site: address, pin, version, reachability, clock offset, ``since`` and
    ``checked_at`` — from the daemon's cache (see the module); never a 30 s wait."""
    with _probing(ctx) as monitor:
        return {site: health.to_dict() for site, health in monitor.current().items()}


def site_health(ctx: Context, site: str) -> SiteHealth | None:
    """The cached health of agent site ``site`` (None: not an agent site, not probed,
    or no daemon's monitor in this process). Never probes."""
    monitor = _monitor(ctx)
    return None if monitor is None else monitor.cached(site)


def require_reachable(ctx: Context, sites: list[str], *, what: str) -> None:
    """Probe each agent site of ``sites`` now (short timeout, not the cache):
    AgentUnreachable naming the first that does not answer, its URL and that
    ``what`` needs it (an agent refusing us: its own error). A site served by
    this process always answers. What the probes see goes into the cache."""
    records = [r for r in (find_agent(ctx.store, site=s) for s in dict.fromkeys(sites)) if r]
    if not records:
        return
    with _probing(ctx) as monitor:
        for record in records:
            try:
                monitor.require(_target(record))
            except AgentUnreachable as e:
                detail = f"{e.fields.get('detail', e)}; {what} needs it"
                raise AgentUnreachable(
                    site=record.site, url=record.url, detail=detail, what=what
                ) from e


def start_monitor(ctx: Context, *, interval: float | None = None) -> HealthMonitor:
    """Start the vault's monitor of agent sites (the daemon, at start-up);
    ``interval`` defaults to ``SITERECOVERY_AGENT_PROBE_INTERVAL`` or 10 s."""
    every = float(os.environ.get(INTERVAL_ENV) or PROBE_INTERVAL) if interval is None else interval
    monitor = _new_monitor(ctx, interval=every)
    with _MONITORS_GUARD:
        _MONITORS[ctx.vault_dir] = monitor
    monitor.start()
    return monitor


def stop_monitor(ctx: Context) -> None:
    """Stop the vault's monitor (the daemon, at shutdown). Idempotent."""
    with _MONITORS_GUARD:
        monitor = _MONITORS.pop(ctx.vault_dir, None)
    if monitor is not None:
        monitor.stop()


def _monitor(ctx: Context) -> HealthMonitor | None:
    with _MONITORS_GUARD:
        return _MONITORS.get(ctx.vault_dir)


@contextmanager
def _probing(ctx: Context) -> Iterator[HealthMonitor]:
    """The daemon's monitor, or (no daemon in this process) one for this call only."""
    monitor = _monitor(ctx)
    if monitor is not None:
        yield monitor
        return
    once = _new_monitor(ctx, interval=PROBE_INTERVAL)
    try:
        yield once
    finally:
        once.stop()


def _new_monitor(ctx: Context, *, interval: float) -> HealthMonitor:
    def targets() -> list[Target]:
        return [_target(r) for r in list_agents(ctx.store)]

    def connect(target: Target, timeout: float) -> AgentClient:
        return _client(ctx, target, timeout)

    return HealthMonitor(targets, connect, interval=interval)


def _target(record: AgentRecord) -> Target:
    return Target(site=record.site, url=record.url, fingerprint=record.fingerprint)


def _client(ctx: Context, target: Target, timeout: float) -> AgentClient:
    """A client of the agent of ``target`` with ``timeout`` (the secret from the vault)."""
    record = find_agent(ctx.store, site=target.site)
    if record is None:
        raise SiteNotFound(name=target.site)
    key = key_store.get_key(ctx.store, master=MasterKey(ctx.vault_dir), name=record.secret_key)
    secret = base64.urlsafe_b64encode(key.material).decode().rstrip("=")
    return AgentClient(record.url, record.cert_pem, secret, site=record.site, timeout=timeout)


def _secret_bytes(secret: str) -> bytes:
    material = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    if len(material) != 32 or base64.urlsafe_b64encode(material).decode().rstrip("=") != secret:
        raise InternalError(detail="the agent answered a secret that is not 32 url-safe bytes")
    return material
