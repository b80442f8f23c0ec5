"""Fixtures of the network-namespace suite (``make test-netns``): see lab.py.

``lab``: the four namespaces of one test, always torn down (processes killed,
namespaces deleted) even when the test fails. ``sites``: on top of it, the
engine in sr-ctl with both agents joined through their namespace addresses
(``POST /sites`` with the agent's URL and a join token made by
``siterecovery agent token`` in its namespace) and one host at each site.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns.lab import Engine, Lab, NsAgent


@dataclass
class Sites:
    lab: Lab
    engine: Engine
    onprem: NsAgent
    cloud: NsAgent


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.fail("the netns suite needs root, ip and tc (iproute2)")
    made = Lab(tmp_path)
    try:
        made.up()
        yield made
    finally:
        made.down()
        left = made.namespaces_left()
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def sites(lab: Lab) -> Sites:
    engine, onprem, cloud = lab.two_sites()
    return Sites(lab, engine, onprem, cloud)
