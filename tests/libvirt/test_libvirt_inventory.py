"""kvm hosts in the inventory: ``host add --kind kvm --uri`` against a real
private libvirtd, and ``vm list --host`` listing the domains it already has.

The engine runs as ``siterecovery serve --lab``; its site agent connects to
the libvirtd of ``tests/libvirt/libvirtd.py`` by the URI the user gives.
Every refusal is checked to change nothing (no host in the vault, none in the
site's ``hosts.json``).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import Daemon, shut_down
from .libvirtd import LibvirtHost

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='{network}'/>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
"""


@pytest.fixture(scope="module")
def kvm_host(
    two_libvirt_hosts: list[LibvirtHost], tmp_path_factory: pytest.TempPathFactory
) -> LibvirtHost:
    """The first private host, with a network ``erp-lan`` and a domain ``erp01``
    defined by hand (siterecovery did not create it)."""
    host = two_libvirt_hosts[0]
    work = tmp_path_factory.mktemp("inv")
    disk = work / "erp01.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "24M"], check=True)
    (work / "net.xml").write_text(
        "<network><name>erp-lan</name><bridge name='srerp0' stp='off'/></network>"
    )
    host.virsh("net-define", str(work / "net.xml"))
    (work / "erp01.xml").write_text(DOMAIN_XML.format(name="erp01", disk=disk, network="erp-lan"))
    host.virsh("define", str(work / "erp01.xml"))
    return host


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One engine for the module (each test adds hosts of its own names)."""
    running = Daemon(tmp_path_factory.mktemp("engine") / "vault").start(lab=True)
    try:
        yield running
    finally:
        shut_down(running)


def _site_hosts(engine: Daemon, site: str) -> dict[str, object]:
    (found,) = [s for s in engine.call("GET", "/sites") if s["name"] == site]
    path = Path(found["path"]) / "hosts.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_a_kvm_host_is_connected_to_and_its_domains_are_listed(
    kvm_host: LibvirtHost, engine: Daemon
) -> None:
    added = engine.call(
        "POST", "/hosts", json={"site": "onprem", "name": "kvm01", "uri": kvm_host.uri}
    )
    assert (added["kind"], added["uri"]) == ("kvm", kvm_host.uri)
    assert {"erp-lan", "srerp0", "default"} <= set(added["switches"])  # asked of libvirt
    assert _site_hosts(engine, "onprem")["kvm01"] == {"kind": "kvm", "uri": kvm_host.uri}

    listed = engine.call("GET", "/vms", params={"host": "kvm01"})
    (erp,) = [v for v in listed if v["name"] == "erp01"]
    assert (erp["managed"], erp["power"], erp["site"], erp["host"]) == (
        False, "stopped", "onprem", "kvm01",
    )  # fmt: skip
    assert erp["disks"] == [{"name": "vda", "size": 24 << 20}]
    assert erp["nics"] == ["erp-lan"] and erp["cpus"] == 2 and erp["memory_mib"] == 128
    # The lab's own VMs are on its local hosts, not on kvm01.
    assert all(v["host"] == "kvm01" for v in listed)
    everything = engine.call("GET", "/vms")
    assert "erp01" not in {v["name"] for v in everything}  # only a host's list asks libvirt
    assert all(v["managed"] for v in everything)


def test_a_switch_the_host_lacks_is_refused_and_nothing_is_recorded(
    kvm_host: LibvirtHost, engine: Daemon
) -> None:
    body = {"site": "onprem", "name": "kvm02", "uri": kvm_host.uri, "switches": ["prod-lan"]}
    status, error = engine.error("POST", "/hosts", json=body)
    assert (status, error["code"]) == (400, "INVALID_INPUT")
    assert "prod-lan" in error["message"] and "erp-lan" in error["message"]
    assert "kvm02" not in {h["name"] for h in engine.call("GET", "/hosts")}
    assert "kvm02" not in _site_hosts(engine, "onprem")
    chosen = engine.call("POST", "/hosts", json={**body, "switches": ["erp-lan"]})
    assert chosen["switches"] == ["erp-lan"]


def test_an_unreachable_uri_is_a_hypervisor_error_and_changes_nothing(
    engine: Daemon, tmp_path: Path
) -> None:
    pytest.importorskip("libvirt")
    uri = f"qemu+unix:///system?socket={tmp_path}/nobody-here"
    status, error = engine.error(
        "POST", "/hosts", json={"site": "onprem", "name": "kvm03", "uri": uri}
    )
    assert error["code"] == "HYPERVISOR_ERROR" and uri in error["message"], error
    assert status >= 400
    assert "kvm03" not in {h["name"] for h in engine.call("GET", "/hosts")}
    assert "kvm03" not in _site_hosts(engine, "onprem")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "kvm"}, "uri"),  # a kvm host without a URI
        ({"kind": "hyperv", "uri": "qemu:///system"}, "uri"),  # a URI on another kind
        ({"kind": "kvm", "uri": "qemu:///sys tem"}, "uri"),
    ],
)
def test_bad_host_input_is_refused_before_any_connection(
    engine: Daemon, body: dict[str, str], field: str
) -> None:
    status, error = engine.error("POST", "/hosts", json={"site": "onprem", "name": "kvm04", **body})
    assert (status, error["code"], error["details"]["field"]) == (400, "INVALID_INPUT", field)
    assert "kvm04" not in {h["name"] for h in engine.call("GET", "/hosts")}
