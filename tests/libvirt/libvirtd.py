"""A private libvirtd per test "host": several independent hosts on one machine.

Each :class:`LibvirtHost` runs ``libvirtd`` (as root, no systemd) in a mount
namespace and a network namespace of its own (``unshare -m -n``): its
``/run/libvirt``, ``/var/lib/libvirt``, ``/etc/libvirt``, ``/var/log/libvirt``
and ``/var/cache/libvirt`` are bind mounts of directories under ``dir``, so
two hosts share no domain, network or socket, and the bridges and taps its
networks make live in its network namespace (they vanish with it instead of
leaking into the machine's). The bind mounts live only in the namespace: they
die with the daemon, nothing is ever mounted in the test's namespace.

The private ``qemu.conf`` runs qemu as root with no security driver and no
ownership changes (nothing to relabel, no AppArmor), and writes qemu's stdio to
files (``stdio_handler = "file"``: no virtlogd). Domains must be
``type='qemu'`` (TCG) on this machine.

The first capabilities request after a start probes qemu (~8 s); a host
seeded with another host's capabilities cache (``seed_cache``) skips that.

Teardown (:meth:`LibvirtHost.stop`), also after a failed test: destroy and
undefine every domain and network, SIGTERM the daemon (SIGKILL after 10 s),
then SIGKILL any qemu whose pid file the host's run directory holds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

QEMU_CONF = """
# siterecovery test host: qemu as root, no relabelling, no virtlogd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
"""
BINDS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "etc": "/etc/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}
"""Private directory (under ``LibvirtHost.dir``) -> where libvirtd sees it."""
START_TIMEOUT = 30.0
_MAX_SOCKET_PATH = 107


def skip_unless_libvirt() -> None:
    """Skip the test when this machine cannot run a private libvirtd."""
    if os.geteuid() != 0:
        pytest.skip("a private libvirtd needs root (mount and network namespaces)")
    for tool in ("libvirtd", "virsh", "unshare", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            pytest.skip(
                f"{tool} is not installed (apt-get install libvirt-daemon-system "
                "libvirt-clients python3-libvirt qemu-system-x86)"
            )
    pytest.importorskip("libvirt")


class LibvirtHost:
    """One private libvirtd; ``uri`` connects to it from the test's namespace."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.dir = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        """Seconds from spawning the daemon to its first answer."""
        self.capabilities_seconds = 0.0
        """Seconds of the first capabilities request (the qemu probe, unless seeded)."""
        socket = self.dir / "run" / "libvirt-sock"
        assert len(str(socket)) <= _MAX_SOCKET_PATH, socket
        self.socket = socket

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    def prepare(self, seed_cache: Path | None = None) -> None:
        """Make the private directories: a copy of /etc/libvirt with our qemu.conf,
        and the capabilities cache of ``seed_cache`` (a ``cache`` dir) if given."""
        for sub in BINDS:
            if sub != "etc":
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/libvirt", self.dir / "etc", symlinks=True, dirs_exist_ok=True)
        with open(self.dir / "etc" / "qemu.conf", "a") as conf:
            conf.write(QEMU_CONF)
        for sub in ("qemu", "qemu/channel/target", "qemu/nvram", "images"):
            (self.dir / "lib" / sub).mkdir(parents=True, exist_ok=True)
        if seed_cache is not None and (seed_cache / "qemu").is_dir():
            shutil.copytree(seed_cache / "qemu", self.dir / "cache" / "qemu", dirs_exist_ok=True)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Spawn the daemon and wait until it answers a connection."""
        mounts = " && ".join(
            f"mkdir -p {target} && mount --bind {self.dir / sub} {target}"
            for sub, target in BINDS.items()
        )
        script = f"{mounts} && exec libvirtd -p {self.dir / 'libvirtd.pid'}"
        log = open(self.dir / "libvirtd.log", "ab")  # noqa: SIM115 (the daemon keeps it)
        started = time.monotonic()
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._wait_answering(timeout)
        self.start_seconds = time.monotonic() - started

    def _wait_answering(self, timeout: float) -> None:
        import libvirt  # type: ignore[import-untyped, import-not-found, unused-ignore]

        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"libvirtd of {self.name} exited: {self.log_tail()}")
            if self.socket.exists():
                with contextlib.suppress(libvirt.libvirtError):
                    libvirt.open(self.uri).close()
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"libvirtd of {self.name} silent after {timeout} s")
            time.sleep(0.02)

    def warm(self) -> None:
        """Ask for the capabilities once (the probe every define needs first)."""
        import libvirt  # type: ignore[import-untyped, import-not-found, unused-ignore]

        started = time.monotonic()
        conn = libvirt.open(self.uri)
        try:
            conn.getCapabilities()
        finally:
            conn.close()
        self.capabilities_seconds = time.monotonic() - started

    def virsh(self, *args: str, check: bool = True) -> str:
        """Run ``virsh -c URI ARGS`` (as a user would); its standard output."""
        done = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=120
        )
        if check and done.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "libvirtd.log").read_text(errors="replace")[-3000:]
        return ""

    def qemu_pids(self) -> list[int]:
        """Pids of the qemu processes this daemon runs (from its pid files)."""
        pids = []
        for pidfile in (self.dir / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                if b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
        return pids

    def stop(self) -> None:
        """Clean every domain and network away, then end the daemon and its qemus."""
        if self.process is None:
            return
        with contextlib.suppress(Exception):
            self._clean()
        pids = self.qemu_pids()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process = None

    def _clean(self) -> None:
        import libvirt  # type: ignore[import-untyped, import-not-found, unused-ignore]

        conn = libvirt.open(self.uri)
        try:
            for domain in conn.listAllDomains(0):
                with contextlib.suppress(libvirt.libvirtError):
                    if domain.isActive():
                        domain.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    domain.undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                    )
            for network in conn.listAllNetworks(0):
                with contextlib.suppress(libvirt.libvirtError):
                    if network.isActive():
                        network.destroy()
        finally:
            conn.close()


def mounts_of(directory: Path) -> list[str]:
    """Lines of this process's mount table that mention ``directory`` (expected: none)."""
    text = Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if str(directory) in line]


@contextlib.contextmanager
def running_hosts(
    root: Path, names: list[str], seed_cache: Path | None = None
) -> Iterator[list[LibvirtHost]]:
    """Start one private libvirtd per name under ``root/NAME``, capabilities probed;
    all stopped at exit, even when a test (or a later start) fails. Without
    ``seed_cache``, the first host's probe seeds the others (~8 s saved each)."""
    hosts: list[LibvirtHost] = []
    try:
        for name in names:
            host = LibvirtHost(root / name, name)
            hosts.append(host)
            host.prepare(seed_cache=seed_cache)
            host.start()
            host.warm()
            seed_cache = seed_cache or host.dir / "cache"
        yield hosts
    finally:
        for host in hosts:
            host.stop()
