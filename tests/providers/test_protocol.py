"""The provider interface has no optional methods: a provider lacking one (say
the marker that keeps a half-synced target from starting) is refused when the
context first loads it, instead of a job skipping the safety step silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.domain.errors import InternalError
from siterecovery.providers.base import PROVIDER_METHODS, PROVIDERS, register
from siterecovery.providers.local.provider import LocalProvider
from siterecovery.services.context import Context
from siterecovery.store.repo import VaultStore


class WithoutMarkers(LocalProvider):
    """The local provider minus the inconsistent-marker methods (a partial provider)."""

    set_inconsistent = None  # type: ignore[assignment]
    is_inconsistent = None  # type: ignore[assignment]


def test_safety_methods_are_part_of_the_protocol() -> None:
    for method in ("set_inconsistent", "is_inconsistent", "guest_state"):
        assert method in PROVIDER_METHODS


def test_a_provider_missing_a_method_is_refused(tmp_path: Path) -> None:
    register("partial")(WithoutMarkers)
    store = VaultStore(f"sqlite:///{tmp_path / 'vault.sqlite'}")
    try:
        ctx = Context(vault_dir=tmp_path, store=store)
        with pytest.raises(InternalError) as refused:
            ctx.provider("partial")
        assert "is_inconsistent" in str(refused.value)
        assert "set_inconsistent" in str(refused.value)
        assert ctx.provider("local").kind == "local"  # the complete one loads
    finally:
        PROVIDERS.pop("partial", None)
        store.close()
