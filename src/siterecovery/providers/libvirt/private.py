"""A private libvirtd: a hypervisor host of its own on this machine.

The lab (``lab up --provider libvirt``) and the tests need several independent
libvirt hosts on one machine, the way a user has ``hv01`` and ``hv02``: one
system libvirtd cannot hold a VM and its failed-over copy under the same
name. :class:`PrivateLibvirtd` runs ``libvirtd`` (as root, no systemd) in a
mount namespace and a network namespace of its own (``unshare -m -n``): its
``/run/libvirt``, ``/var/lib/libvirt``, ``/etc/libvirt``, ``/var/log/libvirt``
and ``/var/cache/libvirt`` are bind mounts of directories under ``dir``, so
two hosts share no domain, network or socket, and the bridges and taps of its
networks live in its network namespace (they vanish with it instead of
leaking into the machine's). The bind mounts exist only in that namespace.
The host is reached at :attr:`PrivateLibvirtd.uri`, a ``qemu+unix`` URI on
its socket.

The private ``qemu.conf`` runs qemu as root with no security driver and no
ownership changes (nothing to relabel, no AppArmor), and writes qemu's stdio
to files (``stdio_handler = "file"``: no virtlogd).

Lifetime: :meth:`PrivateLibvirtd.start` with ``detached`` runs the daemon in
a session of its own, as a real host's libvirtd that the engine does not own
(an engine that stops or dies leaves it, and its guests, running);
:meth:`PrivateLibvirtd.running` finds it again by its pid file. Each start
is the host's reboot: a new network namespace, an empty ``/run/libvirt``,
no qemu of an earlier daemon left. Persistent domains and networks are kept
in ``dir/etc``; networks are autostarted (and :meth:`ensure_network` starts
one that is not), so a host started again has its switches back.
:meth:`PrivateLibvirtd.stop` destroys every domain and network, ends the
daemon (SIGTERM, SIGKILL after 10 s) and kills any qemu its run directory
names; with ``undefine`` it also forgets the domains (the tests' clean slate).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from siterecovery import processes
from siterecovery.domain.errors import HypervisorError, InvalidInput

QEMU_CONF = """
# siterecovery private host: qemu as root, no relabelling, no virtlogd.
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
"""Private directory (under ``PrivateLibvirtd.dir``) -> where libvirtd sees it."""
TOOLS = ("libvirtd", "unshare", "qemu-system-x86_64")
START_TIMEOUT = 30.0
"""Seconds a new daemon has to answer its first connection."""
STOP_TIMEOUT = 10.0
"""Seconds a SIGTERMed daemon has to end before it is killed."""
MAX_SOCKET_PATH = 107
"""The longest path a unix socket may have (``sun_path``, less its NUL)."""
PID_FILE = "libvirtd.pid"
LOG_FILE = "libvirtd.log"


def unavailable() -> str | None:
    """Why this machine cannot run a private libvirtd (None: it can)."""
    if os.geteuid() != 0:
        return "a private libvirtd needs root (mount and network namespaces)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return (
                f"{tool} is not installed (apt-get install libvirt-daemon-system "
                "libvirt-clients python3-libvirt qemu-system-x86)"
            )
    return None


class PrivateLibvirtd:
    """One private libvirtd in ``directory``; ``uri`` connects to it."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.dir = directory
        self.socket = directory / "run" / "libvirt-sock"
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise InvalidInput(
                field="directory",
                reason=f"the host's socket {self.socket} would be longer than "
                f"{MAX_SOCKET_PATH} characters: use a vault with a shorter path",
            )
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        """Seconds from spawning the daemon to its first answer."""
        self.capabilities_seconds = 0.0
        """Seconds of the first capabilities request (the qemu probe, unless seeded)."""

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    def prepare(self, seed_cache: Path | None = None) -> None:
        """Make the private directories (idempotent): a copy of /etc/libvirt with
        our qemu.conf, and the capabilities cache of ``seed_cache`` (a ``cache``
        directory of another host) if given."""
        for sub in BINDS:
            if sub != "etc":
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if not (self.dir / "etc" / "qemu.conf").exists():
            shutil.copytree("/etc/libvirt", self.dir / "etc", symlinks=True, dirs_exist_ok=True)
        conf = self.dir / "etc" / "qemu.conf"
        if QEMU_CONF not in conf.read_text():
            with open(conf, "a") as out:
                out.write(QEMU_CONF)
        for sub in ("qemu", "qemu/channel/target", "qemu/nvram", "images"):
            (self.dir / "lib" / sub).mkdir(parents=True, exist_ok=True)
        if seed_cache is not None and (seed_cache / "qemu").is_dir():
            shutil.copytree(seed_cache / "qemu", self.dir / "cache" / "qemu", dirs_exist_ok=True)

    def start(self, *, detached: bool = False, timeout: float = START_TIMEOUT) -> None:
        """Spawn the daemon and wait until it answers a connection; ``detached``:
        in a session of its own (see the module's docstring)."""
        mounts = " && ".join(
            f"mkdir -p {target} && mount --bind {self.dir / sub} {target}"
            for sub, target in BINDS.items()
        )
        script = f"{mounts} && exec libvirtd -p {self.dir / PID_FILE}"
        self._boot()
        started = time.monotonic()
        with open(self.dir / LOG_FILE, "ab") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=detached,
            )  # fmt: skip
        self._wait_answering(timeout)
        self.start_seconds = time.monotonic() - started

    def running(self) -> int | None:
        """The pid of this host's daemon if it runs (its pid file names a live
        libvirtd whose socket is ours), else None."""
        try:
            pid = int((self.dir / PID_FILE).read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        if not processes.alive(pid) or not argv[0].endswith(b"libvirtd"):
            return None
        return pid if self.socket.exists() else None

    def warm(self) -> None:
        """Ask for the capabilities once (the qemu probe every define needs first)."""
        from siterecovery.providers.libvirt.connection import connect

        started = time.monotonic()
        with connect(self.uri) as conn:
            conn.capabilities()
        self.capabilities_seconds = time.monotonic() - started

    def ensure_network(self, name: str, bridge: str) -> None:
        """A persistent, autostarted network ``name`` on bridge ``bridge`` with no
        IP (hence no dnsmasq), running. Idempotent."""
        from siterecovery.providers.libvirt.connection import connect
        from siterecovery.providers.libvirt.domains import switches

        with connect(self.uri) as conn:
            if name not in switches(conn):
                conn.define_network(
                    f"<network><name>{name}</name><bridge name='{bridge}'/></network>",
                    autostart=True,
                )
            conn.start_network(name)

    def virsh(self, *args: str, check: bool = True) -> str:
        """Run ``virsh -c URI ARGS`` (as a user would); its standard output."""
        done = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=120
        )
        if check and done.returncode != 0:
            raise HypervisorError(
                uri=self.uri, action=f"virsh {' '.join(args)}", detail=done.stderr.strip()
            )
        return done.stdout

    def log_tail(self, limit: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / LOG_FILE).read_text(errors="replace")[-limit:]
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

    def stop(self, *, undefine: bool = False) -> None:
        """Destroy every domain and network (forget the domains too with
        ``undefine``), then end the daemon and its qemus. Idempotent; also ends
        a detached daemon that another process started."""
        pid = self.process.pid if self.process is not None else self.running()
        if pid is None:
            return
        with contextlib.suppress(Exception):
            self._clean(undefine=undefine)
        qemus = self.qemu_pids()
        processes.terminate(pid, timeout=STOP_TIMEOUT)
        for qemu in qemus:
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu, signal.SIGKILL)
        self.process = None

    def _boot(self) -> None:
        """What a host's reboot does before its daemon starts: a new network
        namespace holds none of the old bridges, so no qemu of an earlier
        daemon may go on (killed) and ``/run/libvirt`` starts empty (libvirt
        must not believe those domains and networks still run)."""
        for qemu in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu, signal.SIGKILL)
        shutil.rmtree(self.dir / "run", ignore_errors=True)
        (self.dir / "run").mkdir()
        (self.dir / PID_FILE).unlink(missing_ok=True)

    def _wait_answering(self, timeout: float) -> None:
        from siterecovery.providers.libvirt.connection import connect

        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise HypervisorError(
                    uri=self.uri, action="start a private libvirtd",
                    detail=f"it exited: {self.log_tail(600)}",
                )  # fmt: skip
            if self.socket.exists():
                with contextlib.suppress(HypervisorError), connect(self.uri):
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise HypervisorError(
                    uri=self.uri, action="start a private libvirtd",
                    detail=f"no answer after {timeout:.0f} s: {self.log_tail(600)}",
                )  # fmt: skip
            time.sleep(0.02)

    def _clean(self, *, undefine: bool) -> None:
        from siterecovery.providers.libvirt.connection import connect

        with connect(self.uri) as conn:
            conn.destroy_everything(undefine=undefine)
