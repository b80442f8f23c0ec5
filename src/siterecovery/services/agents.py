"""Sites served by an agent: joining one, and how each answers.

``site add NAME --agent https://HOST:PORT --join TOKEN`` checks the agent's
certificate against the token's pin, spends the token (it works once) and
keeps what the agent answers: its certificate (pinned from then on) and the
engine's secret, as the vault key ``agent-NAME`` (wrapped under the master key).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from siterecovery.agent.client import join
from siterecovery.domain.errors import AlreadyExists, InternalError, InvalidInput
from siterecovery.domain.model import Site
from siterecovery.domain.values import check_name
from siterecovery.keys import SecretKey
from siterecovery.keys.master import MasterKey
from siterecovery.services.context import AGENT_PROVIDER, Context
from siterecovery.services.inventory import parse_role
from siterecovery.store import keys as key_store
from siterecovery.store.agents import AgentRecord, add_agent, list_agents


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
    """Per agent site: address, pin, version, reachability, clock offset (one call each)."""
    return {
        record.site: {**ctx.site(record.site).info().to_dict(), "fingerprint": record.fingerprint}
        for record in list_agents(ctx.store)
    }


def _secret_bytes(secret: str) -> bytes:
    material = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    if len(material) != 32 or base64.urlsafe_b64encode(material).decode().rstrip("=") != secret:
        raise InternalError(detail="the agent answered a secret that is not 32 url-safe bytes")
    return material
