"""Where the local provider keeps its unix sockets (paths are limited to 107 bytes)."""

from __future__ import annotations

import os
from pathlib import Path

RUN_ROOT_ENV = "SITERECOVERY_RUN_DIR"


def run_root() -> Path:
    return Path(os.environ.get(RUN_ROOT_ENV, "/tmp/siterecovery-run"))
