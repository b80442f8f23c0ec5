"""The operations ``siterecovery agent serve`` offers (agent/registry.py).

Two harmless ones used by tests/agent (``echo``, ``count``) and, for an
initialised agent directory, the site operations (``agent/site_ops.py``) of
its site, whose VMs and chains live in ``DIR/site``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from siterecovery.agent import site_ops, state
from siterecovery.agent.registry import Args, Emit, Operations
from siterecovery.agent.wire import AgentWire
from siterecovery.domain.errors import DiskError, InvalidInput
from siterecovery.domain.model import Site, SiteRole
from siterecovery.providers.local.provider import LocalProvider
from siterecovery.sites.local import InProcessAgent


def registry(directory: Path, *, wire_host: str | None = None) -> Operations:
    """The operations of the agent whose directory is ``directory``; with
    ``wire_host``, it serves its wire port there (any free port) and the
    transfers (receive a point, freeze, send a disk) besides."""
    ops = Operations()
    ops.unary("echo")(echo)
    ops.streaming("count")(count)
    if (directory / state.AGENT_FILE).exists():
        wire = None if wire_host is None else AgentWire(state.load(directory).identity, wire_host)
        site_ops.register(ops, site_of(directory, wire), transfers=wire is not None)
    return ops


def site_of(directory: Path, wire: AgentWire | None = None) -> InProcessAgent:
    """This agent's site: the local provider over ``DIR/site`` (its VMs and chains)."""
    found = state.load(directory)
    root = directory / state.SITE_DIR
    site = Site(name=found.site, provider="local", path=str(root), role=SiteRole.ON_PREMISES)
    return InProcessAgent(site, LocalProvider(), wire=wire)


def echo(args: Args) -> Any:
    """``{"args": args}``; with ``refuse: REASON``, InvalidInput(field="refuse")."""
    if "refuse" in args:
        raise InvalidInput(field="refuse", reason=str(args["refuse"]))
    return {"args": args}


def count(args: Args, emit: Emit) -> Any:
    """Emit ``{"i": 0}`` … ``{"i": n-1}`` (``delay`` s apart), return ``{"count": n}``;
    with ``fail_at: K``, a DiskError after K events."""
    n, delay = args.get("n", 3), args.get("delay", 0.0)
    if not isinstance(n, int) or not 0 <= n <= 100_000:
        raise InvalidInput(field="n", reason="must be an integer from 0 to 100000")
    if not isinstance(delay, int | float) or not 0 <= delay <= 10:
        raise InvalidInput(field="delay", reason="must be a number of seconds from 0 to 10")
    fail_at = args.get("fail_at")
    for i in range(n):
        if i == fail_at:
            raise DiskError(detail=f"count failed at {i} as asked")
        emit({"i": i})
        time.sleep(delay)
    return {"count": n}
