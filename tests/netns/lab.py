"""Each site a host of its own: the engine and two site agents in network namespaces.

The topology (``XXXX``: a random suffix per test, so labs of concurrent runs
never meet)::

    sr-ctl-XXXX   198.51.100.1  h-ctl-XXXX ──┐   the engine (siterecovery serve)
    sr-prim-XXXX  198.51.100.2  h-prim-XXXX ─┤   the agent of site onprem
    sr-rec-XXXX   198.51.100.3  h-rec-XXXX ──┤   the agent of site cloud
                                             │
    sr-wan-XXXX   br-XXXX: w-ctl-XXXX, w-prim-XXXX, w-rec-XXXX (veth peers)

Each host namespace has ``lo`` up and one veth (``h-KEY-XXXX``, the host's
end) whose peer (``w-KEY-XXXX``) is enslaved to the bridge of the wan
namespace. Addresses come from 198.51.100.0/24 (TEST-NET-2); there is no
default route and no NAT, so nothing leaves the namespaces the lab made.

- :meth:`Lab.cut` / :meth:`Lab.restore` set a host's wan-side veth down/up
  (the host's own end then reports NO-CARRIER, as an unplugged cable would);
- :meth:`Lab.rate` puts a ``tc tbf`` qdisc on both ends of a host's link, so
  the link carries at most that many bytes per second each way (``netem`` is
  not in this kernel: no delay, no loss);
- every process runs as ``ip netns exec NS .venv/bin/siterecovery ...``
  (``ip netns exec`` execs, so the ``Popen`` pid is the program's own pid and
  ``/proc/PID/io`` is the program's I/O).

How the test reaches the engine. The test process stays in the root
namespace, and ``siterecovery serve`` listens on TCP only (``--host``,
``--port``: no unix socket option), so the engine listens on 127.0.0.1:8470
*inside* sr-ctl and a tiny forwarder (``python lab.py forward``, below), also
inside sr-ctl, accepts on a unix socket in the lab's directory and relays each
connection to it. A path-bound unix socket is reachable through the
filesystem from any network namespace; the forwarder only ever connects to
sr-ctl's own loopback, so no byte of the test's API calls crosses the lab's
wan, and every engine↔agent and agent↔agent byte does. (Running
``ip netns exec sr-ctl siterecovery --json ...`` per call would be the other
honest way; it costs a Python start-up per call and the job waits poll.)

Files: everything lives under the test's ``tmp_path``: ``ctl/`` (the vault,
the engine's log, the forwarder's socket), ``onprem/`` and ``cloud/`` (each
agent's directory ``agent/`` plus its empty cwd, HOME and TMPDIR, and its
log ``agent.out``). Each host has its own ``SITERECOVERY_RUN_DIR`` (the short
directory where the local provider puts qemu-storage-daemon sockets:
``HOST/run`` under ``tmp_path`` when that path is short enough for a unix
socket, else ``/tmp/srn-XXXX/HOST``, removed at teardown).

Teardown (:meth:`Lab.down`, called from the ``lab`` fixture's ``finally``):
SIGTERM every process the lab started (10 s), then SIGKILL whatever is
still in one of the lab's namespaces (VMs' qemu-storage-daemon and workload
processes are the agents' detached children) or names the lab's directories
in its command line, then delete the four namespaces (their veths and bridge
go with them) and the short run directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NET = "198.51.100"
PREFIX = 24
HOSTS = {"ctl": 1, "prim": 2, "rec": 3}
"""Host key -> last octet of its address."""
ENGINE_PORT = 8470
AGENT_PORT = 8471
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
VENV_BIN = Path(sys.executable).parent
SITERECOVERY = str(VENV_BIN / "siterecovery")
PYTHON = sys.executable
HERE = Path(__file__).resolve().parent
_MAX_RUN_DIR = 72
"""Longest run directory we accept: the provider adds ``/<16 hex>/qmp.sock``
and a unix socket path has 107 bytes."""


class LabError(RuntimeError):
    """A command of the lab's plumbing failed."""


def sh(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell); raise LabError with its stderr when it fails and ``check``."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass(frozen=True)
class Host:
    """One host of the lab: its namespace, address and link."""

    key: str
    ns: str
    addr: str
    veth: str
    """The host's end of its link (in ``ns``)."""
    wan_veth: str
    """The other end, a port of the wan bridge."""


@dataclass
class Lab:
    """Four namespaces, three links, and every process started in them."""

    root: Path
    suffix: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, Host] = field(init=False)
    wan: str = field(init=False)
    bridge: str = field(init=False)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)
    short_root: Path = field(init=False)
    _created: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        existing = sh("ip", "netns", "list").stdout
        while f"-{self.suffix}" in existing:
            self.suffix = secrets.token_hex(2)
        s = self.suffix
        self.wan = f"sr-wan-{s}"
        self.bridge = f"br-{s}"
        self.hosts = {
            key: Host(key, f"sr-{key}-{s}", f"{NET}.{octet}", f"h-{key}-{s}", f"w-{key}-{s}")
            for key, octet in HOSTS.items()
        }
        for name in [self.bridge, *(n for h in self.hosts.values() for n in (h.veth, h.wan_veth))]:
            assert len(name) <= 15, name
        self.short_root = Path("/tmp") / f"srn-{s}"

    # -- the network ---------------------------------------------------------------

    def up(self) -> Lab:
        """Make the namespaces, the bridge and the links (see the module doc)."""
        for ns in [self.wan, *(h.ns for h in self.hosts.values())]:
            sh("ip", "netns", "add", ns)
            self._created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.wan, "link", "add", self.bridge, "type", "bridge")
        sh("ip", "-n", self.wan, "link", "set", self.bridge, "up")
        for host in self.hosts.values():
            sh("ip", "link", "add", host.veth, "netns", host.ns, "type", "veth",
               "peer", "name", host.wan_veth, "netns", self.wan)  # fmt: skip
            sh("ip", "-n", host.ns, "addr", "add", f"{host.addr}/{PREFIX}", "dev", host.veth)
            sh("ip", "-n", host.ns, "link", "set", host.veth, "up")
            sh("ip", "-n", self.wan, "link", "set", host.wan_veth, "master", self.bridge, "up")
        return self

    def cut(self, key: str) -> None:
        """Unplug ``key``'s link: its port on the wan bridge goes down."""
        sh("ip", "-n", self.wan, "link", "set", self.hosts[key].wan_veth, "down")

    def restore(self, key: str) -> None:
        """Plug ``key``'s link back in."""
        sh("ip", "-n", self.wan, "link", "set", self.hosts[key].wan_veth, "up")

    def rate(self, key: str, bytes_per_s: int) -> None:
        """Limit ``key``'s link to ``bytes_per_s`` each way (tbf on both veth ends)."""
        host = self.hosts[key]
        burst = max(64 * 1024, bytes_per_s // 20)
        for ns, dev in ((host.ns, host.veth), (self.wan, host.wan_veth)):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
               "rate", f"{bytes_per_s * 8}bit", "burst", str(burst), "latency", "1s")  # fmt: skip

    def unrate(self, key: str) -> None:
        """Take ``key``'s rate limit off."""
        host = self.hosts[key]
        for ns, dev in ((host.ns, host.veth), (self.wan, host.wan_veth)):
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)

    # -- processes -----------------------------------------------------------------

    def argv(self, key: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[key].ns, *argv]

    def run_dir(self, key: str) -> Path:
        """The host's SITERECOVERY_RUN_DIR (short: unix socket paths live in it)."""
        inside = self.root / key / "run"
        chosen = inside if len(str(inside)) <= _MAX_RUN_DIR else self.short_root / key
        chosen.mkdir(parents=True, exist_ok=True)
        return chosen

    def env(self, key: str, home: Path, tmp: Path) -> dict[str, str]:
        return {**os.environ, "HOME": str(home), "TMPDIR": str(tmp),
                "SITERECOVERY_RUN_DIR": str(self.run_dir(key))}  # fmt: skip

    def spawn(
        self, key: str, argv: Sequence[str], *, log: Path, cwd: Path, env: dict[str, str]
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``key``'s namespace (stdout and stderr to ``log``)."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                self.argv(key, argv), stdout=out, stderr=out, cwd=cwd, env=env,
                start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        return process

    def run(
        self, key: str, argv: Sequence[str], *, cwd: Path, env: dict[str, str], timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to its end in ``key``'s namespace."""
        return subprocess.run(
            self.argv(key, argv), cwd=cwd, env=env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    @contextlib.contextmanager
    def capture(self, key: str, out: Path) -> Iterator[Path]:
        """Capture every frame on ``key``'s own veth while inside (tests/netns/capture.py)."""
        ready = out.with_suffix(".ready")
        argv = [PYTHON, str(HERE / "capture.py"), self.hosts[key].veth, str(out), str(ready)]
        process = self.spawn(key, argv, log=out.with_suffix(".log"), cwd=out.parent,
                             env=dict(os.environ))  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"capture did not start: {out.with_suffix('.log').read_text()}")
            time.sleep(0.02)
        try:
            yield out
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=STOP_TIMEOUT)
        if process.returncode != 0:
            raise LabError(f"capture failed: {out.with_suffix('.log').read_text()}")

    def agent(self, key: str, site: str, port: int = AGENT_PORT) -> NsAgent:
        return NsAgent(self, key, site, port)

    def engine(self) -> Engine:
        return Engine(self)

    def two_sites(self) -> tuple[Engine, NsAgent, NsAgent]:
        """The engine and agents ``onprem`` (host prim) and ``cloud`` (host rec),
        started, joined by their namespace addresses, a host at each site."""
        onprem = self.agent("prim", "onprem").init().start()
        cloud = self.agent("rec", "cloud").init().start()
        engine = self.engine().start()
        for agent, role in ((onprem, "on-premises"), (cloud, "cloud")):
            body = {"name": agent.site, "agent": agent.url, "join": agent.token(), "role": role}
            engine.call("POST", "/sites", json=body)
            host = {"site": agent.site, "name": f"{agent.site}-hv", "switches": ["lan"]}
            engine.call("POST", "/hosts", json=host)
        return engine, onprem, cloud

    def pids(self) -> set[int]:
        """Processes in one of the lab's namespaces or naming its directories."""
        found: set[int] = set()
        for ns in self._created:
            out = sh("ip", "netns", "pids", ns, check=False).stdout
            found.update(int(p) for p in out.split())
        needles = [str(self.root).encode(), str(self.short_root).encode()]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes()
                if any(n in cmdline for n in needles):
                    found.add(int(entry.name))
        return found

    def down(self) -> None:
        """Stop every process, delete the namespaces (see the module doc)."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for _ in range(50):
            left = self.pids()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for ns in reversed(self._created):
            sh("ip", "netns", "del", ns, check=False)
        self._created.clear()
        shutil.rmtree(self.short_root, ignore_errors=True)

    def namespaces_left(self) -> list[str]:
        names = [self.wan, *(h.ns for h in self.hosts.values())]
        listed = sh("ip", "netns", "list").stdout.split()
        return [n for n in names if n in listed]


def helper(command: str, *args: str) -> list[str]:
    """The command line of one of this module's helpers (``python lab.py COMMAND ARGS``)."""
    return [PYTHON, str(HERE / "lab.py"), command, *args]


def proc_io(pid: int) -> dict[str, int]:
    """``/proc/PID/io`` (rchar: bytes read through read(2) and friends, any source)."""
    fields = (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {k: int(v) for k, v in fields}


# -- the site agents -------------------------------------------------------------------


class NsAgent:
    """``siterecovery agent`` of ``site`` in host ``key``'s namespace, on its address."""

    def __init__(self, lab: Lab, key: str, site: str, port: int) -> None:
        self.lab, self.key, self.site, self.port = lab, key, site, port
        self.host = lab.hosts[key]
        self.root = lab.root / site
        self.dir = self.root / "agent"
        self.cwd, self.home, self.tmp = self.root / "cwd", self.root / "home", self.root / "tmp"
        self.log = self.root / "agent.out"
        for path in (self.cwd, self.home, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        self.env = lab.env(key, self.home, self.tmp)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host.addr}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cli(self, *args: str) -> dict[str, Any]:
        """``siterecovery ARGS --json`` in the namespace; its JSON document."""
        done = self.lab.run(self.key, [SITERECOVERY, *args, "--json"], cwd=self.cwd, env=self.env)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    def init(self) -> NsAgent:
        self.cli("agent", "init", "--dir", str(self.dir), "--site", self.site)
        return self

    def token(self) -> str:
        return str(self.cli("agent", "token", "--dir", str(self.dir), "--ttl", "1h")["token"])

    def start(self) -> NsAgent:
        """``agent serve --listen ADDR:PORT``; returns once it accepts connections."""
        info = self.dir / "agent-url.json"
        info.unlink(missing_ok=True)
        argv = [SITERECOVERY, "agent", "serve", "--dir", str(self.dir),
                "--listen", f"{self.host.addr}:{self.port}"]  # fmt: skip
        self.process = self.lab.spawn(self.key, argv, log=self.log, cwd=self.cwd, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if info.exists():  # written atomically once the agent serves
                doc = json.loads(info.read_text())
                if doc["pid"] == self.process.pid:
                    assert doc["url"] == self.url, doc
                    return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"agent {self.site} did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash of the agent's machine would (its VMs' processes stay)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()


# -- the engine ------------------------------------------------------------------------


class Engine:
    """``siterecovery serve`` in sr-ctl, and an API client through the unix-socket forwarder."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.root = lab.root / "ctl"
        self.vault = self.root / "vault"
        self.home, self.tmp = self.root / "home", self.root / "tmp"
        for path in (self.home, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
        self.log = self.root / "engine.out"
        self.socket = lab.run_dir("ctl") / "api.sock"
        self.env = lab.env("ctl", self.home, self.tmp)
        self.process: subprocess.Popen[bytes] | None = None
        self.forwarder: subprocess.Popen[bytes] | None = None
        self.client: Any = None
        self._token = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Engine:
        self.vault.mkdir(parents=True, exist_ok=True)
        (self.vault / "daemon.json").unlink(missing_ok=True)
        argv = [SITERECOVERY, "serve", "--vault", str(self.vault), "--host", "127.0.0.1",
                "--port", str(ENGINE_PORT)]  # fmt: skip
        self.process = self.lab.spawn("ctl", argv, log=self.log, cwd=self.root, env=self.env)
        self.socket.unlink(missing_ok=True)
        forward = helper("forward", str(self.socket), "127.0.0.1", str(ENGINE_PORT))
        self.forwarder = self.lab.spawn(
            "ctl", forward, log=self.root / "forwarder.out", cwd=self.root, env=self.env
        )
        deadline = time.monotonic() + START_TIMEOUT * 3
        while not ((self.vault / "daemon.json").exists() and self.socket.exists()):
            for process in (self.process, self.forwarder):
                if process.poll() is not None:
                    raise LabError(f"engine did not start: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"engine did not start in time: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        info = json.loads((self.vault / "daemon.json").read_text())
        assert info["pid"] == self.process.pid and info["url"].endswith(f":{ENGINE_PORT}"), info
        self._token = (self.vault / "token").read_text().strip()
        self.client = self.new_client()
        return self

    def new_client(self) -> Any:
        """An httpx client of the API (one per thread that calls concurrently)."""
        import httpx

        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://sr-ctl/api/v1",
            headers={"Authorization": f"Bearer {self._token}"},
            timeout=300.0,
        )

    def request(self, method: str, path: str, *, client: Any = None, **kwargs: Any) -> Any:
        """The raw response (httpx.Response)."""
        return (client or self.client).request(method, path, **kwargs)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON body of a successful call (AssertionError with the body otherwise)."""
        response = self.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise AssertionError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json()

    def timed(self, method: str, path: str, **kwargs: Any) -> tuple[float, Any]:
        """``(seconds, response)``: how long a call took (printed, never asserted)."""
        started = time.monotonic()
        response = self.request(method, path, **kwargs)
        return time.monotonic() - started, response

    def wait_job(self, job_id: str, timeout: float = 240.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.call("GET", f"/jobs/{job_id}/wait", params={"timeout": 10})
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
        raise AssertionError(f"job {job_id} did not finish: {job}")

    def stop(self) -> None:
        for process in (self.forwarder, self.process):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if self.client is not None:
            self.client.close()


# -- helpers run inside a namespace (python lab.py COMMAND ...) ------------------------
#
# Standard library only: they run as a script, not as part of the tests package.


def forward(unix_path: str, host: str, port: int) -> None:
    """Accept on ``unix_path``; relay every connection to ``host:port`` (both ways)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = unix_path + ".new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    listener.bind(staging)
    listener.listen(64)
    os.rename(staging, unix_path)  # appears only once it accepts
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_relay, args=(client, host, port), daemon=True).start()


def _relay(client: socket.socket, host: str, port: int) -> None:
    try:
        upstream = socket.create_connection((host, port), timeout=10)
        upstream.settimeout(None)
    except OSError:
        client.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def sink(host: str, port: int, ready: str) -> None:
    """Accept one TCP connection on ``host:port`` and read it to its end."""
    listener = socket.create_server((host, port))
    Path(ready).write_text("ready\n")
    connection, _ = listener.accept()
    while connection.recv(1 << 16):
        pass


def send(host: str, port: int, *parts_hex: str) -> None:
    """Connect to ``host:port`` and send each part in its own segment (TCP_NODELAY,
    a pause between parts), so a pattern spanning two parts spans two packets."""
    with socket.create_connection((host, port), timeout=10) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in parts_hex:
            connection.sendall(bytes.fromhex(part))
            time.sleep(0.3)


def main(args: list[str]) -> None:
    command, rest = args[0], args[1:]
    if command == "forward":
        forward(rest[0], rest[1], int(rest[2]))
    elif command == "sink":
        sink(rest[0], int(rest[1]), rest[2])
    elif command == "send":
        send(rest[0], int(rest[1]), *rest[2:])
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
