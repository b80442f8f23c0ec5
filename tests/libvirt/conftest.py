"""Fixtures of the real-guest tests: the Debian guest, booted with plain qemu (TCG).

The guest image comes from the shared cache (``$SITERECOVERY_GUEST_CACHE`` or
``~/.cache/siterecovery/guest``): built once (~15 s with the packages
downloaded), then found at once. Each boot is a ``qemu-system-x86_64`` on one
qcow2 disk in the test's ``tmp_path``, its console read line by line (with the
host's monotonic time of each line) and its guest agent on a unix socket
there. Every qemu started is killed at teardown, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from siterecovery.providers.libvirt.guest_image import GuestImage, build_guest

from .libvirtd import LibvirtHost, mounts_of, running_hosts, skip_unless_libvirt
from .support import connect

BOOT_TIMEOUT = 180.0
"""Seconds a TCG boot may take to acknowledge its first record (a loaded host)."""
_SEQ = re.compile(rb"sr-workload seq=(\d+)")
_MAX_SOCKET_PATH = 107


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()


class AgentError(Exception):
    """The guest agent answered with an error."""


class Agent:
    """A client of the guest agent, on qemu's unix socket of the virtio-serial port."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(path))
        self._reader = self._sock.makefile("rb")
        self._timeout = timeout
        self._next_id = 1000

    def sync(self, timeout: float = BOOT_TIMEOUT) -> None:
        """``guest-sync-delimited`` until the guest answers (it drops what comes
        before its agent opened the port, as qemu-ga's clients expect)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._next_id += 1
            self._sock.settimeout(1.0)
            request = {"execute": "guest-sync-delimited", "arguments": {"id": self._next_id}}
            self._sock.sendall(b"\xff" + json.dumps(request).encode() + b"\n")
            with contextlib.suppress(TimeoutError):
                while True:
                    line = self._reader.readline()
                    if line.startswith(b"\xff") and json.loads(line[1:]) == {
                        "return": self._next_id
                    }:
                        self._sock.settimeout(self._timeout)
                        return
        raise AssertionError(f"the guest agent did not answer within {timeout} s")

    def call(self, name: str, **arguments: Any) -> Any:
        """The ``return`` of one command; AgentError on an ``error`` reply."""
        self.send(name, **arguments)
        reply = json.loads(self._reader.readline())
        if "error" in reply:
            raise AgentError(reply["error"])
        return reply["return"]

    def send(self, name: str, **arguments: Any) -> None:
        request: dict[str, Any] = {"execute": name}
        request |= {"arguments": arguments} if arguments else {}
        self._sock.sendall(json.dumps(request).encode() + b"\n")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


class Guest:
    """One boot of the lab guest: qemu TCG, 256 MiB, ``disk`` as /dev/vda."""

    def __init__(self, image: GuestImage, disk: Path, directory: Path, name: str) -> None:
        self.image = image
        self.disk = disk
        self.socket = directory / f"{name}-qga.sock"
        self.log = directory / f"{name}-console.log"
        self.lines: list[tuple[float, bytes]] = []
        self.started = 0.0
        self.process: subprocess.Popen[bytes] | None = None
        self._agent: Agent | None = None
        assert len(str(self.socket)) <= _MAX_SOCKET_PATH, self.socket

    def start(self, *, rate: float = 20.0, seed: int | None = None) -> None:
        argv = [
            "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "256", "-nographic",
            "-no-reboot", "-kernel", str(self.image.kernel), "-initrd", str(self.image.initramfs),
            "-append", self.image.cmdline(rate=rate, seed=seed),
            "-drive", f"file={self.disk},format=qcow2,if=virtio",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=qga0,path={self.socket},server=on,wait=off",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        threading.Thread(target=self._read_console, daemon=True).start()

    def _read_console(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with open(self.log, "ab") as log:
            for line in self.process.stdout:
                self.lines.append((time.monotonic(), line))
                log.write(line)
                log.flush()

    def seqs(self) -> list[tuple[float, int]]:
        """``(host time, seq)`` of every progress line so far."""
        return [(t, int(m[1])) for t, line in list(self.lines) if (m := _SEQ.search(line))]

    def seq(self) -> int:
        seqs = self.seqs()
        return seqs[-1][1] if seqs else -1

    def wait_for(self, what: Callable[[], bool], description: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"qemu exited ({self.process.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{description} not within {timeout} s: {self.tail()}")
            time.sleep(0.05)

    def wait_seq(self, at_least: int, timeout: float = BOOT_TIMEOUT) -> int:
        self.wait_for(lambda: self.seq() >= at_least, f"seq >= {at_least}", timeout)
        return self.seq()

    def agent(self) -> Agent:
        if self._agent is None:
            self.wait_for(self.socket.exists, "the agent socket", 30.0)
            self._agent = Agent(self.socket)
            self._agent.sync()
        return self._agent

    def shutdown(self, timeout: float = 60.0) -> int:
        """``guest-shutdown``, then wait for qemu to exit; returns its status."""
        self.agent().send("guest-shutdown")
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no power-off within {timeout} s: {self.tail()}") from None

    def output(self) -> bytes:
        return b"".join(line for _, line in list(self.lines))

    def tail(self) -> str:
        return self.output()[-3000:].decode(errors="replace")

    def kill(self) -> None:
        if self._agent is not None:
            self._agent.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()


@pytest.fixture
def boot(guest_image: GuestImage, tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    """``boot(disk, rate=20, seed=None)`` starts a guest; all are killed at teardown."""
    guests: list[Guest] = []

    def start(disk: Path, *, rate: float = 20.0, seed: int | None = None) -> Guest:
        guest = Guest(guest_image, disk, tmp_path, f"boot{len(guests)}")
        guests.append(guest)
        guest.start(rate=rate, seed=seed)
        return guest

    yield start
    for guest in guests:
        guest.kill()


# Private libvirt hosts ------------------------------------------------------------


@pytest.fixture(scope="module")
def two_libvirt_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LibvirtHost]]:
    """Two private libvirtds, ``east`` and ``west``, for the whole module."""
    skip_unless_libvirt()
    root = tmp_path_factory.mktemp("lv")
    with running_hosts(root, ["east", "west"]) as hosts:
        yield hosts
    assert mounts_of(root) == []  # Nothing was ever mounted out here.


@pytest.fixture(scope="module")
def libvirt_host(two_libvirt_hosts: list[LibvirtHost]) -> LibvirtHost:
    return two_libvirt_hosts[0]


@pytest.fixture
def conn(libvirt_host: LibvirtHost) -> Iterator[Any]:
    """A connection to ``libvirt_host``, closed after the test."""
    with connect(libvirt_host) as opened:
        yield opened
