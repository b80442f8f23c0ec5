"""The wire policy of one transfer between two sites, as the engine hands it
to both agents (:class:`~siterecovery.sites.base.Transfer`).

The item's policy gives the compression, the key and the item's cap; the
sending site's record its shared cap. The key's material is read from the
vault (unwrapped with the master key) for each transfer and travels only in
the bodies of the engine's calls to the two agents (pinned TLS, the agent's
secret): the receiver registers its ticket with it, the sender seals with it.
Neither agent stores it, and ``Transfer``'s ``repr`` leaves it out.
"""

from __future__ import annotations

from siterecovery.context import Context
from siterecovery.domain.model import Policy
from siterecovery.services.keys import transfer_key
from siterecovery.sites.base import Transfer


def transfer_of(
    ctx: Context, policy: Policy, *, threads: int, max_rate: int, site_max_rate: int, verify: bool
) -> Transfer:
    """The transfer of a disk under ``policy``, sent by a site whose cap is
    ``site_max_rate`` (KeyNotFound when the policy's key left the vault)."""
    key = None if policy.key is None else transfer_key(ctx, name=policy.key)
    return Transfer(
        threads=threads,
        max_rate=max_rate,
        site_max_rate=site_max_rate,
        compress=policy.compress == "zstd",
        key=None if key is None else key.name,
        key_material=None if key is None else key.material.hex(),
        verify=verify,
    )
