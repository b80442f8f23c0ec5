"""The context: what services, jobs and the replication engine need, built
once per process — the composition root that wires the vault's store, the
providers and each site's data plane (:meth:`Context.site`: this process, or
the site's agent). It sits beside the layers, not in one: services, jobs and
replication all take it, and it imports none of them."""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass, field
from pathlib import Path

from siterecovery.agent.client import AgentClient
from siterecovery.domain.errors import AgentSiteUnsupported, InvalidInput
from siterecovery.domain.model import Site
from siterecovery.keys.master import MasterKey
from siterecovery.providers.base import PROVIDERS, Provider, check_provider, load_builtins
from siterecovery.sites.base import SiteAgent
from siterecovery.sites.local import InProcessAgent
from siterecovery.sites.remote import RemoteAgent
from siterecovery.store.agents import AgentRecord, find_agent
from siterecovery.store.keys import get_key
from siterecovery.store.repo import VaultStore

AGENT_PROVIDER = "agent"
"""The provider name of a site served by an agent (``site add --agent``)."""


@dataclass
class Context:
    """The vault directory, its store and the providers of its sites.

    Thread-safe: the store opens a session per call and providers are
    stateless between calls. Work on one item is serialised by its ownership
    in the vault (``services/ownership.py``), across processes.
    """

    vault_dir: Path
    store: VaultStore
    _providers: dict[str, Provider] = field(default_factory=dict)
    _sites: dict[str, SiteAgent] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def provider(self, site: Site | str) -> Provider:
        name = site.provider if isinstance(site, Site) else site
        if name == AGENT_PROVIDER:
            where = site.name if isinstance(site, Site) else "?"
            raise AgentSiteUnsupported(site=where, what="this operation")
        with self._guard:
            if name not in self._providers:
                load_builtins()
                if name not in PROVIDERS:
                    known = ", ".join(sorted(PROVIDERS))
                    raise InvalidInput(
                        field="provider", reason=f"unknown '{name}' (known: {known})"
                    )
                provider = PROVIDERS[name]()
                check_provider(name, provider)
                self._providers[name] = provider
            return self._providers[name]

    def site(self, site: Site | str) -> SiteAgent:
        """The data plane of ``site``: its agent, or this process for a local site."""
        record = site if isinstance(site, Site) else self.store.get_site(name=site)
        with self._guard:
            found = self._sites.get(record.name)
        if found is not None:
            return found
        remote = find_agent(self.store, site=record.name)
        agent: SiteAgent = (
            InProcessAgent(record, self.provider(record))
            if remote is None
            else RemoteAgent(record.name, self._client(remote))
        )
        with self._guard:
            return self._sites.setdefault(record.name, agent)

    def _client(self, record: AgentRecord) -> AgentClient:
        """The site agent's client, with the engine's secret from the vault's keys."""
        key = get_key(self.store, master=MasterKey(self.vault_dir), name=record.secret_key)
        secret = base64.urlsafe_b64encode(key.material).decode().rstrip("=")
        return AgentClient(record.url, record.cert_pem, secret, site=record.site)
