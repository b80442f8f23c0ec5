"""The ``azure-blob`` provider's replica store: recovery points in Azure page blobs.

:class:`~siterecovery.providers.azure.replicas.AzureBlobReplicaStore` keeps each
disk's chain as one page blob and its snapshots; :class:`AzureSiteConfig` says
how a site's ``path`` names the container and where its credentials are read.
"""

from siterecovery.providers.azure.config import AzureSiteConfig
from siterecovery.providers.azure.replicas import AzureBlobReplicaStore

__all__ = ["AzureBlobReplicaStore", "AzureSiteConfig"]
