"""siterecovery: open, self-hosted site recovery for virtual machines."""

__version__ = "0.1.0"
