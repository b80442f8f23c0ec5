"""The lab's real guest: its build, its agent, and boots of it under TCG.

The boot tests run ``qemu-system-x86_64 -machine q35,accel=tcg`` on a qcow2
disk and judge the guest by real bytes: the disk image, opened on the host and
checked by the journal check ``vm check`` uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.domain.errors import GuestError
from siterecovery.providers.libvirt import guest_image as guest_image_module
from siterecovery.providers.libvirt.guest import agent
from siterecovery.providers.libvirt.guest_image import (
    GuestImage,
    build_guest,
    detect_accel,
    our_sources,
)
from siterecovery.providers.local import journal
from siterecovery.providers.local.guest import read_state

from .conftest import Agent, AgentError, Guest

DISK_SIZE = 64 * 1024 * 1024
Boot = Callable[..., Guest]


def new_disk(path: Path) -> Path:
    qemu_img.create(path, DISK_SIZE)
    return path


def check_image(disk: Path, work: Path, *, live: bool = False) -> journal.CheckReport:
    """The journal check of a qcow2 image, read through a raw copy of it.

    ``live``: the image is open in a running qemu (``-U``); only meaningful
    while the guest is frozen (every record it wrote is flushed, qcow2
    metadata included).
    """
    raw = work / f"{disk.stem}-copy.raw"
    share = ["-U"] if live else []
    subprocess.run(
        ["qemu-img", "convert", *share, "-f", "qcow2", "-O", "raw", str(disk), str(raw)],
        check=True,
        capture_output=True,
    )
    try:
        with FileDevice.open(raw) as device:
            return journal.check([device])
    finally:
        raw.unlink()


def image_digest(disk: Path, work: Path) -> str:
    raw = work / f"{disk.stem}-digest.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(disk), str(raw)],
        check=True,
        capture_output=True,
    )
    try:
        return hashlib.sha256(raw.read_bytes()).hexdigest()
    finally:
        raw.unlink()


def no_apt(tmp_path: Path) -> dict[str, str]:
    """An environment whose apt-get and apt-cache fail loudly (and leave a mark)."""
    bin_dir = tmp_path / "no-apt"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("apt-get", "apt-cache"):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\ntouch {tmp_path}/apt-was-called\nexit 100\n")
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


# The build ---------------------------------------------------------------------


@pytest.mark.guest
def test_the_guest_is_built_from_debian_packages(guest_image: GuestImage) -> None:
    manifest = json.loads((guest_image.kernel.parent / "manifest.json").read_text())
    assert guest_image.kernel.stat().st_size > 1_000_000
    assert guest_image.initramfs.read_bytes()[:6] == b"070701"  # newc cpio, uncompressed
    assert guest_image.root_image is None
    assert guest_image.kernel_release.endswith("-cloud-amd64")
    packages = manifest["packages"]
    assert set(packages) >= {
        "python3.11-minimal", "python3-numpy", "python3-xxhash", "busybox-static",
        f"linux-image-{guest_image.kernel_release}",
    }  # fmt: skip
    assert all(packages.values())


def test_the_guest_holds_only_the_modules_the_workload_imports() -> None:
    ours = our_sources()
    assert "providers/local/workload.py" in ours
    assert "providers/local/journal.py" in ours
    assert "disk/file.py" in ours
    assert "providers/libvirt/guest/agent.py" in ours
    assert not [p for p in ours if p.startswith(("disk/nbd", "api/", "store/", "cli/"))]


@pytest.mark.guest
def test_a_second_build_is_cached_and_needs_no_apt(
    guest_image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = no_apt(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])
    again = build_guest()
    assert again == guest_image
    assert not (tmp_path / "apt-was-called").exists()
    cli = subprocess.run(
        [sys.executable, "-m", "siterecovery.providers.libvirt.guest_image"],
        env=env, capture_output=True, check=True, text=True,
    )  # fmt: skip
    printed = json.loads(cli.stdout)
    assert printed["kernel"] == str(guest_image.kernel)
    assert printed["initramfs"] == str(guest_image.initramfs)
    assert printed["digest"] == guest_image.digest
    assert not (tmp_path / "apt-was-called").exists()


@pytest.mark.guest
def test_two_concurrent_builders_build_once(guest_image: GuestImage, tmp_path: Path) -> None:
    """A fresh cache holding only the packages (no apt at all): two builders at
    once both return the same guest, and no partial build is left behind."""
    shared = guest_image.kernel.parents[2]
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    for deb in (shared / "debs").glob("*.deb"):
        os.link(deb, cache / "debs" / deb.name)
    shutil.copyfile(shared / "resolved.json", cache / "resolved.json")
    argv = [sys.executable, "-m", "siterecovery.providers.libvirt.guest_image", "--cache"]
    env = no_apt(tmp_path)
    builders = [
        subprocess.Popen([*argv, str(cache)], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [json.loads(builder.communicate(timeout=600)[0]) for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0]
    assert outputs[0] == outputs[1]
    assert outputs[0]["digest"] == guest_image.digest
    assert [p.name for p in (cache / "images").iterdir()] == [guest_image.digest]
    built = Path(outputs[0]["initramfs"]).read_bytes()
    assert built == guest_image.initramfs.read_bytes()  # The build is reproducible.
    assert not (tmp_path / "apt-was-called").exists()


@pytest.mark.guest
def test_the_accelerator_is_detected_once_per_process(
    guest_image: GuestImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    accel = detect_accel(guest_image)
    assert accel in ("kvm", "tcg")

    def booted_again(_image: object) -> bool:
        raise AssertionError("the canary was booted a second time")

    monkeypatch.setattr(guest_image_module, "_kvm_boots", booted_again)
    assert detect_accel(guest_image) == accel
    print(f"\naccelerator: {accel}")


# The agent, on the host --------------------------------------------------------


class FakeControl:
    """The workload's control socket, as the responder sees it."""

    def __init__(self) -> None:
        self.depth = 0
        self.seq = 41
        self.fail = False

    def quiesce(self, timeout: float = 60.0) -> int:
        self.depth += 1
        return self.seq

    def thaw(self) -> None:
        self.depth = max(0, self.depth - 1)

    def status(self) -> dict[str, Any]:
        if self.fail:
            raise GuestError(detail="the guest workload does not answer")
        return {"seq": self.seq, "paused": self.depth > 0, "depth": self.depth}


def ask(responder: agent.Responder, request: dict[str, Any]) -> Any:
    reply = responder.reply(json.dumps(request).encode())
    return None if reply is None else json.loads(reply.lstrip(b"\xff"))


def test_the_splitter_cuts_a_stream_into_objects() -> None:
    splitter = agent.Splitter()
    assert splitter.feed(b'  {"execute": "a", "arguments": {"s": "}{\\"') == []
    assert splitter.feed(b'"}}\n{"execute"') == [b'{"execute": "a", "arguments": {"s": "}{\\""}}']
    assert splitter.feed(b'\xff{"execute": "b"}') == [b'{"execute": "b"}']  # 0xFF: reset
    assert splitter.feed(b"garbage {}") == [b"{}"]
    assert splitter.feed(b"{" + b" " * (70 * 1024)) == [b""]  # Too large.


def test_the_responder_speaks_the_guest_agent_protocol() -> None:
    control, asked = FakeControl(), []
    responder = agent.Responder(control, freeze_timeout=5.0, on_shutdown=asked.append)
    delimited = responder.reply(b'{"execute": "guest-sync-delimited", "arguments": {"id": 7}}')
    assert delimited == b'\xff{"return": 7}\n'
    assert ask(responder, {"execute": "guest-ping", "id": "x"}) == {"return": {}, "id": "x"}
    info = ask(responder, {"execute": "guest-info"})["return"]
    names = {c["name"] for c in info["supported_commands"]}
    assert {"guest-fsfreeze-freeze", "guest-fsfreeze-thaw", "sr-status"} <= names
    assert ask(responder, {"execute": "sr-status"})["return"]["seq"] == 41
    assert ask(responder, {"execute": "guest-fsfreeze-freeze"}) == {"return": 1}
    assert ask(responder, {"execute": "guest-fsfreeze-status"}) == {"return": "frozen"}
    refused = ask(responder, {"execute": "guest-shutdown"})["error"]
    assert refused["class"] == "CommandNotFound" and "frozen" in refused["desc"]
    assert ask(responder, {"execute": "guest-fsfreeze-thaw"}) == {"return": 1}
    assert ask(responder, {"execute": "guest-fsfreeze-thaw"}) == {"return": 0}
    assert ask(responder, {"execute": "nonesuch"})["error"]["class"] == "CommandNotFound"
    assert ask(responder, {"execute": "guest-shutdown", "arguments": {"mode": "x"}})["error"]
    assert ask(responder, {"execute": "guest-shutdown"}) is None  # No reply, as qemu-ga.
    assert asked == ["powerdown"]
    control.fail = True
    assert "does not answer" in ask(responder, {"execute": "sr-status"})["error"]["desc"]
    assert "error" in ask(responder, {"no": "execute"})


def test_the_kernel_command_line_sets_the_workload() -> None:
    config = agent.parse_cmdline("console=ttyS0 quiet sr.rate=5 sr.seed=7 sr.freeze_timeout=9")
    assert config == agent.GuestConfig(rate=5.0, seed=7, disk="/dev/vda", freeze_timeout=9.0)
    assert agent.parse_cmdline("quiet") == agent.GuestConfig()


def test_the_workload_runs_on_a_device_file_without_libnbd(tmp_path: Path) -> None:
    """What the guest runs, on the host: ``--device`` needs no libnbd."""
    disk = tmp_path / "d0.raw"
    create_raw(disk, DISK_SIZE)
    state = tmp_path / "state.json"
    argv = [
        sys.executable, "-c",
        "import runpy, sys; sys.modules['nbd'] = None; "
        "runpy.run_module('siterecovery.providers.local.workload', run_name='__main__')",
        "--device", str(disk), "--control", str(tmp_path / "c.sock"), "--state", str(state),
        "--rate", "200", "--seed", "5", "--format",
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (state.exists() and read_state(state)["seq"] >= 20):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.terminate()
        assert process.wait(30) == 0
    with FileDevice.open(disk) as device:
        report = journal.check([device])
    assert report.consistent, report.errors
    assert report.last_seq == read_state(state)["seq"] >= 20
    assert report.seed == 5


# Boots (TCG) -------------------------------------------------------------------


@pytest.mark.guest
def test_the_guest_writes_records_vm_check_reads(boot: Boot, tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "d0.qcow2")
    guest = boot(disk, rate=20, seed=7)
    first = guest.wait_seq(1)
    assert first >= 1
    guest.wait_seq(60)
    assert guest.shutdown() == 0
    stopped = int(guest.output().split(b"sr-workload stopped seq=")[1].split()[0])
    report = check_image(disk, tmp_path)
    assert report.consistent, report.errors
    assert report.last_seq == stopped >= 60
    assert report.seed == 7
    _measure(guest, "write")


@pytest.mark.guest
def test_a_freeze_holds_the_disk_still_until_thaw(boot: Boot, tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "d0.qcow2")
    guest = boot(disk, rate=20, seed=11)
    guest.wait_seq(5)
    channel: Agent = guest.agent()
    assert channel.call("guest-fsfreeze-status") == "thawed"
    started = time.monotonic()
    assert channel.call("guest-fsfreeze-freeze") == 1
    latency = time.monotonic() - started
    frozen = channel.call("sr-status")
    assert frozen["paused"] is True
    assert channel.call("guest-fsfreeze-status") == "frozen"
    before = image_digest(disk, tmp_path)
    time.sleep(2.0)
    assert channel.call("sr-status")["seq"] == frozen["seq"]
    assert image_digest(disk, tmp_path) == before
    report = check_image(disk, tmp_path, live=True)
    assert report.consistent, report.errors
    assert report.last_seq == frozen["seq"]
    with pytest.raises(AgentError, match="frozen state"):
        channel.call("guest-fsfreeze-freeze")
    assert channel.call("guest-fsfreeze-thaw") == 1
    guest.wait_for(lambda: channel.call("sr-status")["seq"] > frozen["seq"], "writes", 30.0)
    assert channel.call("guest-fsfreeze-status") == "thawed"
    assert guest.shutdown() == 0
    print(f"\nfreeze latency {latency * 1000:.0f} ms")


@pytest.mark.guest
def test_a_second_boot_continues_the_journal(boot: Boot, tmp_path: Path) -> None:
    disk = new_disk(tmp_path / "d0.qcow2")
    first = boot(disk, rate=20, seed=7)
    first.wait_seq(20)
    assert first.shutdown() == 0
    last = check_image(disk, tmp_path).last_seq
    second = boot(disk, rate=20, seed=99)  # The journal keeps its seed.
    second.wait_seq(last + 20)
    assert second.seqs()[0][1] == last
    assert second.shutdown() == 0
    report = check_image(disk, tmp_path)
    assert report.consistent, report.errors
    assert report.last_seq >= last + 20
    assert report.seed == 7


def _measure(guest: Guest, label: str) -> None:
    """Print boot-to-first-record time and the record rate (host clock)."""
    seqs = [(t, s) for t, s in guest.seqs() if s > 0]
    first_at = seqs[0][0] - guest.started
    (t0, s0), (t1, s1) = seqs[0], seqs[-1]
    rate = (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0
    print(f"\n{label}: first record {first_at:.1f} s after qemu start, {rate:.1f} records/s")
