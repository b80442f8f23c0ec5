"""The service context: what every service function needs, built once per process."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.model import Site
from siterecovery.providers.base import PROVIDERS, Provider, check_provider, load_builtins
from siterecovery.store.repo import VaultStore


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
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def provider(self, site: Site | str) -> Provider:
        name = site.provider if isinstance(site, Site) else site
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
