"""The vault on both backends: every test taking ``store`` runs on SQLite and on
a real PostgreSQL (``tests/conftest.py: postgres``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.store.repo import VaultStore


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[VaultStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'vault.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_db")
    opened = VaultStore(url)
    yield opened
    opened.close()
