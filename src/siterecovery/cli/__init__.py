"""The `siterecovery` command line: a thin client of the daemon's REST API (see main)."""
