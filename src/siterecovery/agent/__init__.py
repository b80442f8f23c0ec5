"""The site agent: the data plane of one site (see docs/ARCHITECTURE.md, Sites).

``siterecovery agent serve`` (cli/agent_cmd.py) runs on a machine of its site.
tls.py: its self-signed identity, pinned by fingerprint · tokens.py: the
one-time join token · state.py: the agent directory (identity, pending and
used tokens, engine secrets) · registry.py: the operations it offers ·
operations.py: which ones ``serve`` registers · server.py: the HTTPS control
API · client.py: the engine's side (``join``, ``AgentClient``).
"""
