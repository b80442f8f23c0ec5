"""The fault matrix's lab (one vault, its daemon restarted at will) and its table.

Each case records one row (job type, step, when, outcome, records lost); the
session prints them as the matrix and writes ``faults-matrix.md`` and
``faults-matrix.json`` to ``$SR_FAULTS_REPORT_DIR`` (default
``/tmp/siterecovery-faults``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import Daemon, _stop_vms

ROWS: list[dict[str, Any]] = []
REPORT_DIR = Path(tempfile.gettempdir()) / "siterecovery-faults"


class FaultLab:
    """A vault and its one daemon, started, crashed and restarted by the case."""

    def __init__(self, vault: Path) -> None:
        self.vault = vault
        self.daemon = Daemon(vault)

    def start(self, *, lab: bool = False, env: dict[str, str] | None = None) -> Daemon:
        return self.daemon.start(lab=lab, env=env)

    def restart(self, env: dict[str, str] | None = None) -> Daemon:
        """Stop the daemon if it still runs (SIGTERM), start it again with ``env``."""
        self.daemon.stop()
        if self.daemon.client is not None:
            self.daemon.client.close()
        return self.daemon.start(env=env)

    def close(self) -> None:
        self.daemon.stop()
        _stop_vms(self.vault)


@pytest.fixture
def fault_lab(tmp_path: Path) -> Iterator[FaultLab]:
    lab = FaultLab(tmp_path / "vault")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def matrix_row(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The case's row of the table (the case fills it; a failure is recorded by
    the case itself, with its reason)."""
    row: dict[str, Any] = {"case": request.node.name}
    yield row
    ROWS.append(row)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    lines = render(ROWS)
    terminalreporter.section("SIGKILL fault matrix")
    for line in lines:
        terminalreporter.write_line(line)
    where = Path(os.environ.get("SR_FAULTS_REPORT_DIR") or REPORT_DIR)
    where.mkdir(parents=True, exist_ok=True)
    (where / "faults-matrix.md").write_text("\n".join(lines) + "\n")
    (where / "faults-matrix.json").write_text(json.dumps(ROWS, indent=1) + "\n")
    terminalreporter.write_line(f"matrix written to {where / 'faults-matrix.md'}")


def render(rows: list[dict[str, Any]]) -> list[str]:
    head = "| job type | job kind | step | kill | outcome | records lost | s | notes |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = (
            r.get("title", ""), r.get("kind", ""), r.get("step", ""), r.get("when", ""),
            r.get("outcome", "FAILED: (no outcome recorded)"), r.get("lost", "?"),
            r.get("seconds", ""), "; ".join(r.get("notes", [])),
        )  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return lines
