"""Secrets at rest: private vault files, wrapped key material, master-key rotation.

Real vaults on real files; the rotation and redaction tests run a real daemon.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from siterecovery.daemon import init_vault, vault_url
from siterecovery.domain.errors import KeyUnreadable
from siterecovery.keys import SecretKey, encode_material, generate
from siterecovery.keys.master import MASTER_BYTES, MasterKey, wrap
from siterecovery.store import keys as key_store
from siterecovery.store.repo import VaultStore

from ..conftest import Daemon
from ..failover.support import job, protect

PRIVATE = ("config.json", "token", "master.key", "vault.sqlite", "dbos.sqlite")


def run_cli(vault: Path, *args: str, code: int = 0) -> Any:
    """The one JSON document of ``siterecovery ARGS --json``, run under umask 022."""
    argv = [sys.executable, "-m", "siterecovery", "--vault", str(vault), *args, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.umask(0o022))  # fmt: skip
    assert done.returncode == code, done.stdout + done.stderr
    return json.loads(done.stdout)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(vault: Path) -> dict[str, int]:
    """Mode of the vault and of everything in it but the lab's site directories."""
    found = {".": mode(vault)}
    for path in vault.rglob("*"):
        if "sites" not in path.relative_to(vault).parts:
            found[str(path.relative_to(vault))] = mode(path)
    return found


def spellings(secret: bytes) -> list[bytes]:
    """The forms a secret could be written in: raw, hex, base64, URL-safe base64."""
    return [secret, secret.hex().encode(), base64.b64encode(secret),
            base64.urlsafe_b64encode(secret).rstrip(b"=")]  # fmt: skip


def database_bytes(vault: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(vault.glob("*.sqlite*")))


def stored_material(vault: Path, name: str) -> str:
    from siterecovery.store.keys import KeyRow

    store = VaultStore(vault_url(vault))
    try:
        with store.session() as s:
            row = s.get(KeyRow, name)
            assert row is not None
            return row.material
    finally:
        store.close()


def load(vault: Path, name: str) -> SecretKey:
    store = VaultStore(vault_url(vault))
    try:
        return key_store.get_key(store, master=MasterKey(vault), name=name)
    finally:
        store.close()


def add(vault: Path, name: str) -> SecretKey:
    store = VaultStore(vault_url(vault))
    try:
        key = generate(name, datetime.now(UTC))
        return key_store.add_key(store, master=MasterKey(vault), key=key)
    finally:
        store.close()


def test_a_fresh_vault_is_private_whatever_the_umask(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    run_cli(vault, "init")
    found = modes(vault)
    assert found["."] == 0o700
    assert {name: found[name] for name in PRIVATE} == dict.fromkeys(PRIVATE, 0o600)
    assert set(found.values()) == {0o700, 0o600}, found
    assert len((vault / "master.key").read_bytes()) == MASTER_BYTES


def test_key_material_is_wrapped_in_the_database(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    init_vault(vault)
    key = add(vault, "dr")
    stored = stored_material(vault, "dr")
    assert stored.startswith("v1:") and len(stored) <= 64
    assert stored != encode_material(key.material)
    found = database_bytes(vault)
    assert not [form for form in spellings(key.material) if form in found]
    assert load(vault, "dr") == key


def test_another_master_key_or_another_name_opens_nothing(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    init_vault(vault)
    key = add(vault, "dr")
    master = (vault / "master.key").read_bytes()
    # The same material wrapped under another name does not open as "dr".
    from siterecovery.store.keys import KeyRow

    store = VaultStore(vault_url(vault))
    try:
        with store.session() as s:
            s.add(KeyRow(name="copy", created=key.created, fingerprint=key.fingerprint,
                         material=stored_material(vault, "dr")))  # fmt: skip
    finally:
        store.close()
    with pytest.raises(KeyUnreadable):
        load(vault, "copy")
    (vault / "master.key").write_bytes(os.urandom(MASTER_BYTES))
    with pytest.raises(KeyUnreadable) as refused:
        load(vault, "dr")
    assert refused.value.code == "KEY_UNREADABLE" and "master.key" in str(refused.value)
    (vault / "master.key").write_bytes(master)
    assert load(vault, "dr") == key


def test_an_older_vault_is_made_private_and_its_keys_wrapped(tmp_path: Path) -> None:
    """A vault of before this change: loose modes, no master key, plaintext rows."""
    from siterecovery.store.keys import KeyRow

    vault = tmp_path / "vault"
    init_vault(vault)
    (vault / "master.key").unlink()
    key = generate("old", datetime.now(UTC))
    store = VaultStore(vault_url(vault))
    try:
        with store.session() as s:
            s.add(KeyRow(name=key.name, created=key.created, fingerprint=key.fingerprint,
                         material=encode_material(key.material)))  # fmt: skip
    finally:
        store.close()
    vault.chmod(0o755)
    for name in ("config.json", "token", "vault.sqlite"):
        (vault / name).chmod(0o644)
    assert base64.b64encode(key.material) in database_bytes(vault)
    assert load(vault, "old") == key  # readable before the upgrade too

    init_vault(vault)
    assert mode(vault) == 0o700 and {mode(vault / n) for n in PRIVATE} == {0o600}
    assert stored_material(vault, "old").startswith("v1:")
    found = database_bytes(vault)
    assert not [form for form in spellings(key.material) if form in found]
    assert load(vault, "old") == key


def test_rotate_master_rewraps_every_key_and_retires_the_old_master(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    init_vault(vault)
    keys = [add(vault, name) for name in ("a", "b", "c")]
    before = {k.name: stored_material(vault, k.name) for k in keys}
    old = (vault / "master.key").read_bytes()
    answer = run_cli(vault, "key", "rotate-master")
    assert answer["keys"] == 3 and len(answer["master"]) == 16
    assert (vault / "master.key").read_bytes() != old and mode(vault / "master.key") == 0o600
    assert not (vault / "master.key.new").exists()
    assert all(stored_material(vault, k.name) != before[k.name] for k in keys)
    assert [load(vault, k.name) for k in keys] == keys
    found = database_bytes(vault)
    assert not [v for v in before.values() if v.encode() in found]  # old wraps scrubbed
    (vault / "master.key").write_bytes(old)
    with pytest.raises(KeyUnreadable):
        load(vault, "a")


def test_a_rotation_interrupted_at_any_step_leaves_every_key_readable(tmp_path: Path) -> None:
    """Each crash point of the ordering, reproduced by stopping after that step."""
    from siterecovery.store.keys import KeyRow, open_keys

    vault = tmp_path / "vault"
    init_vault(vault)
    first = add(vault, "first")
    master = MasterKey(vault)
    # Crash after step 1: master.key.new written, rows still under master.key.
    following = master.next_key()
    assert load(vault, "first") == first
    second = add(vault, "second")  # a daemon adding a key meanwhile
    # Crash after step 2: rows re-wrapped under master.key.new, not yet renamed.
    store = VaultStore(vault_url(vault))
    try:
        with store.session() as s:
            row = s.get(KeyRow, "first")
            assert row is not None
            row.material = wrap(following, "first", first.material)
    finally:
        store.close()
    assert [load(vault, "first"), load(vault, "second")] == [first, second]
    # The next open finishes the rotation: every key under the new master key.
    store = VaultStore(vault_url(vault))
    try:
        open_keys(store, master=master)
    finally:
        store.close()
    assert (vault / "master.key").read_bytes() == following
    assert not (vault / "master.key.new").exists()
    assert [load(vault, "first"), load(vault, "second")] == [first, second]
    assert wrap(following, "second", second.material) == stored_material(vault, "second")


def test_a_running_daemon_keeps_working_through_a_rotation(vault: Path) -> None:
    daemon = Daemon(vault).start()
    try:
        made = daemon.call("POST", "/keys", json={"name": "before"})
        answer = run_cli(vault, "key", "rotate-master")
        assert answer["keys"] == 1
        assert daemon.call("GET", "/keys") == [made]
        after = daemon.call("POST", "/keys", json={"name": "after"})
        assert daemon.call("GET", "/keys") == [after, made]
    finally:
        daemon.stop()
    assert load(vault, "after").fingerprint == after["fingerprint"]
    assert load(vault, "before").fingerprint == made["fingerprint"]


def test_tokens_and_key_material_never_reach_logs_job_records_or_databases(
    daemon: Daemon, vault: Path
) -> None:
    """A day's work with refusals and a failed job, then every file the daemon
    writes is searched for the token and the key material, in every spelling."""
    token = (vault / "token").read_text().strip()
    daemon.call("POST", "/keys", json={"name": "dr"})
    assert daemon.error("POST", "/keys", json={"name": "dr"})[0] == 409
    assert daemon.error("POST", "/keys", json={"name": ["not", "a", "name"]})[0] == 400
    assert daemon.error("GET", "/jobs/no-such-job")[0] == 404
    assert daemon.client is not None
    wrong = {"Authorization": f"Bearer {token[:-4]}xxxx"}
    assert daemon.client.get("/keys", headers=wrong).status_code == 401
    protect(daemon, "web01")
    daemon.call("POST", "/plans", json={"name": "broken"})
    daemon.call("POST", "/plans/broken/vms", json={"group": 1, "vms": ["web01"]})
    action = {"group": 1, "name": "fails", "kind": "script", "when": "before", "command": "exit 3"}
    daemon.call("POST", "/plans/broken/actions", json=action)
    answer = daemon.call("POST", "/plans/broken/failover", json={"type": "test"})
    assert job(daemon, answer, state="failed")["error"]["code"] == "ACTION_FAILED"
    jobs = json.dumps(daemon.call("GET", "/jobs")).encode()
    running = modes(vault)  # SQLite's -wal and -shm files exist while the daemon runs
    daemon.stop()

    material = load(vault, "dr").material
    files = [vault / "logs" / "daemon.log", vault.parent / "daemon.out",
             *vault.glob("vault.sqlite*"), *vault.glob("dbos.sqlite*")]  # fmt: skip
    assert (vault / "logs" / "daemon.log").stat().st_size > 0
    secrets = [*spellings(material), token.encode()]
    leaks = [(p.name, s) for p in files for s in secrets if s in p.read_bytes()]
    assert leaks == [] and not [s for s in secrets if s in jobs]
    assert {"vault.sqlite-wal", "vault.sqlite-shm", "daemon.json"} <= set(running)
    for found in (running, modes(vault)):
        assert found["."] == found["logs"] == 0o700 and found["logs/daemon.log"] == 0o600
        assert {m for name, m in found.items() if name not in (".", "logs")} == {0o600}, found


def test_on_a_postgresql_vault_the_master_key_stays_in_the_vault_directory(
    postgres_db: str, vault: Path
) -> None:
    import sqlalchemy

    init_vault(vault, db_url=postgres_db)
    assert mode(vault / "config.json") == 0o600 and mode(vault / "master.key") == 0o600
    assert not (vault / "vault.sqlite").exists() and not (vault / "dbos.sqlite").exists()
    key = add(vault, "dr")
    assert run_cli(vault, "key", "rotate-master")["keys"] == 1
    engine = sqlalchemy.create_engine(postgres_db)
    with engine.connect() as conn:
        stored = conn.execute(sqlalchemy.text("SELECT material FROM keys")).scalar_one()
    engine.dispose()
    assert stored.startswith("v1:") and encode_material(key.material) not in stored
    assert load(vault, "dr") == key
