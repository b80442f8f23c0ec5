"""Benchmarks of siterecovery, run apart from the test suite.

``python -m bench.datapath`` (``make bench``) measures the data plane against
cp, qemu-img, nbdcopy and rsync; ``bench/phase2_downtime.py`` measures the
phase-2 downtime of a delta failback; ``bench/agents.py`` (``make bench-agents``)
measures site agents in network namespaces against in-process sites.
"""
