"""Two sites, two agent processes, one engine: a protected VM's bytes go from
agent to agent, and the engine reads none of them.

The engine (``siterecovery serve``) joins agents ``onprem`` and ``cloud``
(``siterecovery agent serve`` on 127.0.0.1, each with its wire port on TLS);
a VM created at ``onprem`` runs there (its qemu-storage-daemon and workload
are the agent's children); ``protect`` seals its first point at ``cloud``
with the integrity proof (whole-disk digests of the frozen source and of the
point, computed by each agent on its own disk); a ``replicate`` pass moves
the guest's new writes. The engine's I/O counters (``/proc/PID/io``) show it
read a small fraction of what crossed.
"""

from __future__ import annotations

from tests.agent.conftest import Agent
from tests.agent.conftest import io_counters as _io
from tests.conftest import Daemon

MiB = 1 << 20


def test_a_protected_vm_replicates_agent_to_agent(sites: tuple[Daemon, Agent, Agent]) -> None:
    engine, onprem, cloud = sites
    vm = {"name": "app01", "host": "onprem-hv", "disks": [64 * MiB]}
    created = engine.call("POST", "/vms", json=vm)
    assert created["site"] == "onprem" and created["power"] == "running"
    # The VM's disk lives in the onprem agent's directory, nowhere else.
    assert (onprem.dir / "site" / "vms" / "app01" / "disks" / "d0.qcow2").exists()

    assert engine.process is not None and onprem.process is not None
    before = _io(engine.process.pid)
    agent_before = _io(onprem.process.pid)
    job = engine.wait_job(engine.call("POST", "/items", json={"vm": "app01", "to": "cloud"})["job"])
    assert job["state"] == "succeeded", job
    item = engine.call("GET", "/items/app01")
    assert item["state"] == "protected"
    sync = next(s for s in job["steps"] if s["name"] == "initial-sync")["detail"]
    disk = sync["disks"]["d0"]
    assert disk["mode"] == "full" and disk["source_digest"] == disk["target_digest"]
    assert disk["bytes_written"] > 0
    chain = cloud.dir / "site" / "replicas" / "app01" / "d0"
    assert [p.name for p in chain.iterdir()] == ["p000001.qcow2"]

    pass_ = engine.call("POST", "/items/app01/replicate")
    second = pass_["disks"]["d0"]
    assert second["mode"] == "tracked" and second["tracking"] == "bitmap"
    after = _io(engine.process.pid)
    moved = disk["source_bytes_read"] + second["source_bytes_read"]
    read = after["rchar"] - before["rchar"]
    sent = _io(onprem.process.pid)["wchar"] - agent_before["wchar"]
    # The source agent read the disk (from its VM's daemon, through NBD) and
    # wrote it to the wire (TLS records: ``wchar``); what the engine read
    # (vault pages, HTTP answers) is a small fraction of that.
    assert moved > MiB and sent >= moved, (sent, moved)
    assert read < moved / 4, (read, moved)
    assert sorted(p.name for p in chain.iterdir()) == ["p000001.qcow2", "p000002.qcow2"]
