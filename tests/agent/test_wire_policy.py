"""The wire policy between two agents: compression, a key sealing every frame
in flight, and bandwidth caps per item and per site.

An engine and two agent processes (``sites`` in conftest.py). The key is made
in the engine's vault; the engine hands its material to both agents of each
transfer over their authenticated channel (the receiver registers the
ticket with it, the sender seals with it), so it must never appear in a log,
a job, an answer or an agent's directory. The VM's data is a text pattern:
zstd shrinks it, so the bytes on the wire say whether it was compressed.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from siterecovery.agent.tls import client_context
from siterecovery.disk.nbd import NbdDevice
from siterecovery.domain.errors import DecryptionFailed, SiteRecoveryError
from siterecovery.domain.model import Site, SiteRole
from siterecovery.keys import SecretKey, decode_material
from siterecovery.providers.local.provider import LocalProvider
from siterecovery.sites.base import Receipt
from siterecovery.sites.local import InProcessAgent
from siterecovery.wire.client import RemoteDevice
from tests.agent.conftest import Agent
from tests.conftest import Daemon
from tests.failover.support import failover, job, step

MiB = 1 << 20
Sites = tuple[Daemon, Agent, Agent]


def sr(vault: Path, *args: str, code: int = 0) -> Any:
    """The one JSON document of ``siterecovery --json ARGS`` (exit status ``code``)."""
    done = _run(vault, "--json", *args)
    assert done.returncode == code, done.stdout + done.stderr
    return json.loads(done.stdout)


def _run(vault: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "siterecovery", "--vault", str(vault), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def _pattern(size: int, tag: int) -> bytes:
    """Text lines: compressible, and not zero (zeroes would not be sent as data)."""
    lines = b"".join(b"wire policy %d line %010d\n" % (tag, i) for i in range(size // 20 + 1))
    return lines[:size]


def _fill(agent: Agent, vm: str, offset: int, size: int, tag: int) -> None:
    """Write the pattern into the running VM's disk d0 at the agent's site."""
    site = Site(agent.site, "local", str(agent.dir / "site"), SiteRole.ON_PREMISES)
    socket = LocalProvider().run_dir(site, f"vm-{vm}") / "nbd.sock"
    with NbdDevice.connect(socket, "d0", writable=True) as disk:
        disk.write(offset, memoryview(_pattern(size, tag)))
        disk.flush()


def _spellings(secret: bytes) -> list[bytes]:
    return [secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret),
            base64.urlsafe_b64encode(secret).rstrip(b"=")]  # fmt: skip


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _vm(engine: Daemon, name: str) -> None:
    body = {"name": name, "host": "onprem-hv", "disks": [64 * MiB], "workload": False}
    assert engine.call("POST", "/vms", json=body)["power"] == "running"


# -- the site's one bucket ---------------------------------------------------------


def test_a_site_sends_every_transfer_through_one_bucket(tmp_path: Path) -> None:
    site = InProcessAgent(Site("s", "local", str(tmp_path), SiteRole.ON_PREMISES), LocalProvider())
    assert site._site_cap(0) is None  # no cap, no bucket
    bucket = site._site_cap(MiB)
    assert bucket is not None and bucket.rate == MiB
    assert site._site_cap(2 * MiB) is bucket and bucket.rate == 2 * MiB  # the latest's rate
    assert site._site_cap(0) is None and bucket.rate == 0  # lifted for running ones too
    assert site._site_cap(MiB) is bucket


# -- refusals: nothing is created ------------------------------------------------------


def test_unknown_keys_and_compressions_are_refused_and_change_nothing(sites: Sites) -> None:
    engine, _onprem, _cloud = sites
    _vm(engine, "app01")
    body = {"vm": "app01", "to": "cloud", "interval": "1h"}
    status, error = engine.error("POST", "/items", json={**body, "key": "missing"})
    assert (status, error["code"]) == (404, "KEY_NOT_FOUND") and "key list" in error["message"]
    status, error = engine.error("POST", "/items", json={**body, "compress": "lz4"})
    assert (status, error["code"]) == (400, "INVALID_INPUT")
    assert error["details"]["field"] == "compress" and "none or zstd" in error["message"]
    # The engine's secret for an agent is no transfer key: it would reach the other agent.
    status, error = engine.error("POST", "/items", json={**body, "key": "agent-cloud"})
    assert (status, error["code"]) == (400, "INVALID_INPUT") and "agent" in error["message"]
    refused = sr(engine.vault, "protect", "app01", "--to", "cloud", "--key", "missing", code=4)
    assert refused["error"]["code"] == "KEY_NOT_FOUND"
    refused = sr(engine.vault, "protect", "app01", "--to", "cloud", "--compress", "lz4", code=2)
    assert refused["error"]["details"]["field"] == "compress"
    assert engine.call("GET", "/items") == [] and engine.call("GET", "/jobs") == []


def test_a_ticket_with_a_key_refuses_a_sender_without_it(sites: Sites) -> None:
    """The receiving agent registers the ticket with the transfer's key: the
    wire refuses a sender that has no key, or another one, before any write."""
    _engine, _onprem, cloud = sites
    mine = SecretKey("k1", datetime.now(UTC), os.urandom(32))
    other = SecretKey("k1", datetime.now(UTC), os.urandom(32))
    transfer = {"threads": 1, "compress": True, "key": "k1", "key_material": mine.material.hex()}
    with cloud.client(cloud.join()) as client:
        found = client.call("site.receive_point", item="t1", disk="d0", seq=1, size=MiB,
                            resume=False, transfer=transfer)  # fmt: skip
        receipt = Receipt.from_dict(found)
        try:
            tls = client_context(receipt.cert_pem) if receipt.cert_pem else None
            for key in (None, other):
                with pytest.raises(DecryptionFailed):
                    RemoteDevice.connect(receipt.address, size=MiB, key=key, compress=True,
                                         ticket=receipt.ticket, tls=tls)  # fmt: skip
            device = RemoteDevice.connect(receipt.address, size=MiB, key=mine, compress=True,
                                          ticket=receipt.ticket, tls=tls)  # fmt: skip
            device.write(0, memoryview(_pattern(MiB, 0)))
            device.flush()
            device.close()
        finally:
            client.call("site.end_receive", receipt=receipt.to_dict(), keep=False)

        # Material that is not a key is refused before anything opens, never echoed.
        marker = "feedc0de" * 7 + "zz" * 4
        for bad in ({**transfer, "key_material": marker}, {**transfer, "key_material": None},
                    {**transfer, "key_material": marker, "unknown": marker}):  # fmt: skip
            with pytest.raises(SiteRecoveryError) as refused:
                client.call("site.receive_point", item="t2", disk="d0", seq=1, size=MiB,
                            resume=False, transfer=bad)  # fmt: skip
            assert refused.value.code == "INTERNAL"
            assert marker not in json.dumps(refused.value.to_dict())
    assert not (cloud.dir / "site" / "replicas" / "t2").exists()
    assert marker.encode() not in cloud.log.read_bytes()


# -- the story -------------------------------------------------------------------------


def test_compressed_sealed_capped_replication_and_failback(sites: Sites, tmp_path: Path) -> None:
    engine, onprem, cloud = sites
    vault = engine.vault
    engine.call("POST", "/keys", json={"name": "wire1"})
    exported = sr(vault, "key", "export", "wire1", "--to", str(tmp_path / "wire1.key"))
    assert "material" not in exported
    material = decode_material(json.loads((tmp_path / "wire1.key").read_text())["material"])
    _vm(engine, "app01")
    _fill(onprem, "app01", 0, 8 * MiB, 1)

    # protect --compress zstd --key: the initial sync is sealed and compressed.
    done = sr(vault, "protect", "app01", "--to", "cloud", "--interval", "1h",
              "--compress", "zstd", "--key", "wire1", "--wait")  # fmt: skip
    assert done["state"] == "succeeded", done
    sync = step(done, "initial-sync")["disks"]["d0"]
    assert sync["mode"] == "full" and sync["sealed"] is True and sync["compressed"] is True
    assert sync["source_digest"] == sync["target_digest"]
    assert sync["bytes_written"] >= 8 * MiB
    assert 0 < sync["bytes_on_wire"] < sync["bytes_written"] / 4, sync
    assert sync["site_max_rate"] == 0 and sync["site_throttled_seconds"] == 0

    shown = sr(vault, "item", "show", "app01")
    assert shown["policy"]["compress"] == "zstd" and shown["policy"]["key"] == "wire1"
    human = _run(vault, "item", "show", "app01").stdout
    assert "compress=zstd" in human and "key=wire1" in human

    # A policy change naming no vault key, or no compression we know: nothing changes.
    status, error = engine.error("PATCH", "/items/app01", json={"key": "nope"})
    assert (status, error["code"]) == (404, "KEY_NOT_FOUND")
    status, error = engine.error("PATCH", "/items/app01", json={"compress": "gzip"})
    assert (status, error["code"], error["details"]["field"]) == (400, "INVALID_INPUT", "compress")
    assert engine.call("GET", "/items/app01")["policy"] == shown["policy"]
    sr(vault, "item", "set", "app01", "--key", "wire1", "--no-key", code=2)
    assert sr(vault, "item", "set", "app01", "--no-key")["policy"]["key"] is None
    assert sr(vault, "item", "set", "app01", "--key", "wire1")["policy"] == shown["policy"]

    # The site's cap: 1 MiB/s over everything onprem sends; the pass slept on it.
    capped = sr(vault, "site", "set", "onprem", "--max-rate", "1M")
    assert capped["max_rate"] == MiB
    listed = {s["name"]: s for s in sr(vault, "site", "list")}
    assert listed["onprem"]["max_rate"] == MiB and listed["cloud"]["max_rate"] == 0
    _fill(onprem, "app01", 16 * MiB, 2 * MiB, 2)
    report = engine.call("POST", "/items/app01/replicate", json={})["disks"]["d0"]
    assert report["mode"] == "tracked" and report["sealed"] and report["compressed"]
    assert report["site_max_rate"] == MiB and report["max_rate"] == 0
    assert report["site_throttled_seconds"] > 0 and report["throttled_seconds"] == 0, report
    assert sr(vault, "site", "set", "onprem", "--max-rate", "0")["max_rate"] == 0

    # Fail over, commit, then a full failback: the target VM's own disks
    # (receive_disks at onprem) take the sealed, compressed stream too.
    job(engine, failover(engine, "app01", type="unplanned", point="latest"))
    job(engine, engine.call("POST", "/items/app01/commit", json={}))
    back = job(engine, failover(engine, "app01", type="planned", sync="full"))
    download = step(back, "full-download")["disks"]["d0"]
    assert download["sealed"] is True and download["compressed"] is True
    assert download["source_digest"] == download["target_digest"]
    assert 0 < download["bytes_on_wire"] < download["bytes_written"] / 4, download
    assert back["result"]["integrity"]["equal"] is True

    # The material is nowhere: logs, jobs, answers, the vault's databases
    # (wrapped there), either agent's directory.
    jobs = [engine.call("GET", f"/jobs/{j['id']}") for j in engine.call("GET", "/jobs")]
    answers = json.dumps([jobs, engine.call("GET", "/items"), engine.call("GET", "/keys")])
    places = {"answers": answers.encode()}
    for path in [vault.parent / "daemon.out", onprem.log, cloud.log, *_files(vault),
                 *_files(onprem.dir), *_files(cloud.dir)]:  # fmt: skip
        places[str(path)] = path.read_bytes()
    for where, text in places.items():
        for spelled in _spellings(material):
            assert spelled not in text, where
