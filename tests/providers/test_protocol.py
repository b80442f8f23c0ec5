"""The provider interfaces have no optional methods: a provider whose
hypervisor or replica store lacks one (say the marker that keeps a half-synced
target from starting) is refused when the context first loads it, instead of
a job skipping the safety step silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from siterecovery.context import Context
from siterecovery.domain.errors import InternalError
from siterecovery.providers.base import HYPERVISOR_METHODS, PROVIDERS, REPLICA_METHODS, register
from siterecovery.providers.local.provider import LocalHypervisor, LocalProvider
from siterecovery.store.repo import VaultStore


class HypervisorWithoutMarkers(LocalHypervisor):
    """The local hypervisor minus the inconsistent-marker methods."""

    set_inconsistent = None  # type: ignore[assignment]
    is_inconsistent = None  # type: ignore[assignment]


class WithoutMarkers(LocalProvider):
    """The local provider with that partial hypervisor."""

    def __init__(self) -> None:
        super().__init__()
        self.hypervisor = HypervisorWithoutMarkers()


def test_safety_methods_are_part_of_the_protocols() -> None:
    for method in ("set_inconsistent", "is_inconsistent", "guest_state", "disk_access"):
        assert method in HYPERVISOR_METHODS
    for method in ("begin", "seal", "discard", "point_image", "adopt"):
        assert method in REPLICA_METHODS


def test_a_provider_missing_a_method_is_refused(tmp_path: Path) -> None:
    register("partial")(WithoutMarkers)
    store = VaultStore(f"sqlite:///{tmp_path / 'vault.sqlite'}")
    try:
        ctx = Context(vault_dir=tmp_path, store=store)
        with pytest.raises(InternalError) as refused:
            ctx.provider("partial")
        assert "hypervisor.is_inconsistent" in str(refused.value)
        assert "hypervisor.set_inconsistent" in str(refused.value)
        assert ctx.provider("local").kind == "local"  # the complete one loads
    finally:
        PROVIDERS.pop("partial", None)
        store.close()
