"""The whole daemon on a PostgreSQL vault: vault tables and DBOS's schema on one server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy

from ..conftest import Daemon, _stop_vms


def test_protect_on_a_postgresql_vault(postgres_db: str, vault: Path) -> None:
    init = [sys.executable, "-m", "siterecovery", "--vault", str(vault), "--json", "init"]
    subprocess.run([*init, "--db-url", postgres_db], check=True, capture_output=True)
    daemon = Daemon(vault).start(lab=True)
    try:
        body = {"vm": "web01", "to": "cloud", "interval": "1h"}
        job = daemon.wait_job(daemon.call("POST", "/items", json=body)["job"])
        assert job["state"] == "succeeded", job
        daemon.call("POST", "/items/web01/replicate", json={"app_consistent": True})
        assert daemon.call("GET", "/items/web01")["points"] == 2
        daemon.call("POST", "/lab/down")
    finally:
        daemon.stop()
        _stop_vms(vault)
    assert not (vault / "vault.sqlite").exists() and not (vault / "dbos.sqlite").exists()
    engine = sqlalchemy.create_engine(postgres_db)
    with engine.connect() as conn:
        points = conn.execute(sqlalchemy.text("select count(*) from points")).scalar_one()
        workflows = conn.execute(
            sqlalchemy.text("select count(*) from dbos.workflow_status where status = 'SUCCESS'")
        ).scalar_one()
    engine.dispose()
    assert (points, workflows) == (2, 1)
