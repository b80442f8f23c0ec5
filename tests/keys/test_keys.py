"""Encryption keys in the vault: created, listed, found; their material never shown.

The store functions run on a real SQLite vault; the CLI and the API run
against a real daemon, whose answers and log must never hold the material.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from siterecovery.daemon import init_vault, vault_url
from siterecovery.domain.errors import AlreadyExists, InvalidInput, KeyNotFound
from siterecovery.keys import KEY_BYTES, SecretKey, encode_material, fingerprint, generate
from siterecovery.keys.master import MasterKey
from siterecovery.store import keys as key_store
from siterecovery.store.repo import VaultStore

from ..conftest import Daemon


@pytest.fixture
def store(tmp_path: Path) -> VaultStore:
    init_vault(tmp_path / "vault")
    return VaultStore(vault_url(tmp_path / "vault"))


@pytest.fixture
def master(tmp_path: Path) -> MasterKey:
    return MasterKey(tmp_path / "vault")


def test_keys_are_stored_found_and_listed(store: VaultStore, master: MasterKey) -> None:
    made = [generate(name, datetime.now(UTC)) for name in ("b-key", "a-key")]
    for key in made:
        key_store.add_key(store, master=master, key=key)
    found = key_store.get_key(store, master=master, name="b-key")
    assert found == made[0] and len(found.material) == KEY_BYTES
    assert [k.name for k in key_store.list_keys(store, master=master)] == ["a-key", "b-key"]
    assert found.fingerprint == fingerprint(made[0].material) != made[1].fingerprint


def test_refusals_change_nothing(store: VaultStore, master: MasterKey) -> None:
    key = key_store.add_key(store, master=master, key=generate("dr", datetime.now(UTC)))
    with pytest.raises(AlreadyExists):
        key_store.add_key(store, master=master, key=generate("dr", datetime.now(UTC)))
    with pytest.raises(KeyNotFound) as missing:
        key_store.get_key(store, master=master, name="nope")
    assert missing.value.code == "KEY_NOT_FOUND" and "key list" in str(missing.value)
    with pytest.raises(InvalidInput):
        generate("bad name!", datetime.now(UTC))
    assert key_store.list_keys(store, master=master) == [key]


def test_the_material_is_never_shown() -> None:
    key = generate("dr", datetime.now(UTC))
    shown = repr(key) + json.dumps(key.describe())
    assert key.material.hex() not in shown and encode_material(key.material) not in shown
    assert set(key.describe()) == {"name", "created", "fingerprint"}
    with pytest.raises(InvalidInput):
        SecretKey(name="dr", created=key.created, material=b"short")


def cli(vault: Path, *args: str, code: int = 0) -> Any:
    run = subprocess.run(
        [sys.executable, "-m", "siterecovery", "--vault", str(vault), *args, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == code, run.stdout + run.stderr
    return json.loads(run.stdout)


def test_key_commands_through_the_daemon(vault: Path) -> None:
    daemon = Daemon(vault).start()
    try:
        created = cli(vault, "key", "create", "dr")
        assert set(created) == {"name", "created", "fingerprint"}
        refused = cli(vault, "key", "create", "dr", code=3)
        assert refused["error"]["code"] == "ALREADY_EXISTS"
        listed = cli(vault, "key", "list")
        assert listed == [created] == daemon.call("GET", "/keys")
    finally:
        daemon.stop()
    store = VaultStore(vault_url(vault))
    try:
        material = key_store.get_key(store, master=MasterKey(vault), name="dr").material
    finally:
        store.close()
    assert created["fingerprint"] == fingerprint(material)
    logs = [vault.parent / "daemon.out", vault / "logs" / "daemon.log"]
    log = "".join(p.read_text() for p in logs if p.exists()) + json.dumps(listed)
    assert encode_material(material) not in log and material.hex() not in log
