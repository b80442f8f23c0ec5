"""The wire over a WAN: one connection through a delaying TCP proxy.

``python -m bench.wire_wan`` (``--quick`` for a smoke test). A random source
file of 256 MiB (quick: 64 MiB) is synced over the wire (``threads=1``: one
reader, one writer, so one data connection) to a receiver in another
process, through a **delaying TCP proxy** in a third process: this kernel
has no netem, so a proxy forwards every chunk it reads after a fixed one-way
delay of RTT/2, in both directions, in order, with unbounded buffering (its
reader never waits for its writer), so that it adds latency and never a
bandwidth limit. Cases: RTT 0, 20 and 50 ms; the old stop-and-wait
(``window=1``) and the default window; plain TCP and TLS (the receiver's
self-signed agent certificate, pinned by the sender). Each case runs
``--runs`` times, interleaved, and the table shows medians of throughput
(source bytes / seconds of ``sync``, which includes the data connection's
handshake and the last window's drain) and their ratio to the 0 ms case of
the same window and transport. Every run is checked (untimed): the
receiver's whole-disk digest equals the source's.

    python -m bench.wire_wan [--quick] [--runs N] [--rtt 0,20,50] [--dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

MiB = 1 << 20
CHUNK = 1 << 20
"""Bytes the proxy reads at once."""
TARGET = 0.80
"""Throughput at 20 and 50 ms with the default window, relative to 0 ms."""


@dataclass
class Case:
    tls: bool
    window: int
    rtt_ms: int
    seconds: list[float] = field(default_factory=list)
    """Of each whole sync."""
    steady: list[float] = field(default_factory=list)
    """MiB/s of each sync's middle half (25% to 75% of the bytes sent)."""

    @property
    def label(self) -> str:
        return f"{'TLS' if self.tls else 'TCP'} window={self.window} rtt={self.rtt_ms}ms"


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    if args.serve:
        return _serve(Path(args.serve), args.tls_dir)
    if args.proxy:
        return _proxy(args.proxy, args.delay_ms)
    return _bench(args)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.wire_wan", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 MiB, one run: a smoke test.")
    parser.add_argument("--runs", type=int, help="Runs per case (default 3, quick 1).")
    parser.add_argument("--rtt", default="0,20,50", help="RTTs, ms; the first is the reference.")
    parser.add_argument("--windows", default="1,32", help="Windows, frames (default 1,32).")
    parser.add_argument("--dir", type=Path, help="Scratch directory (default: new in /tmp).")
    parser.add_argument("--json", metavar="FILE", help="Also write the cases as JSON.")
    parser.add_argument("--serve", metavar="TARGET", help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", help=argparse.SUPPRESS)
    parser.add_argument("--proxy", metavar="UPSTREAM", help=argparse.SUPPRESS)
    parser.add_argument("--delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# The benchmark.


def _bench(args: argparse.Namespace) -> int:
    from siterecovery.agent.tls import make_identity

    size = (64 if args.quick else 256) * MiB
    runs = args.runs or (1 if args.quick else 3)
    rtts = [int(ms) for ms in args.rtt.split(",")]
    windows = [int(frames) for frames in args.windows.split(",")]
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="sr-wan-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    helpers: list[_Helper] = []
    try:
        source = _source(workdir / "src.raw", size)
        identity = make_identity(workdir / "tls", "receiver")
        links: dict[tuple[bool, int], str] = {}
        for tls in (False, True):
            receiver = _Helper.start(
                "--serve", str(workdir / f"dst-{int(tls)}.raw"),
                *(["--tls-dir", str(workdir / "tls")] if tls else []),
            )  # fmt: skip
            helpers.append(receiver)
            for rtt in rtts:
                proxy = _Helper.start("--proxy", receiver.address, "--delay-ms", str(rtt / 2))
                helpers.append(proxy)
                links[tls, rtt] = proxy.address
        cases = [Case(tls, w, rtt) for tls in (False, True) for w in windows for rtt in rtts]
        for tls in (False, True):  # Warm-up, untimed: page cache, imports, first-run costs.
            cert = identity.cert_pem if tls else None
            _run(source, links[tls, rtts[0]], Case(tls, max(windows), rtts[0]), cert)
        for _ in range(runs):  # Interleaved: the machine's noise hits every case alike.
            for case in cases:
                cert = identity.cert_pem if case.tls else None
                _run(source, links[case.tls, case.rtt_ms], case, cert)
                rate = size / MiB / case.seconds[-1]
                _say(f"{case.label}: {rate:.0f} MiB/s, steady {case.steady[-1]:.0f} MiB/s")
    finally:
        for helper in helpers:
            helper.stop()
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(_markdown(cases, size, runs, time.monotonic() - started))
    if args.json:
        doc = [
            {**asdict(c), "mib_s": size / MiB / statistics.median(c.seconds),
             "steady_mib_s": statistics.median(c.steady)}
            for c in cases
        ]  # fmt: skip
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _source(path: Path, size: int) -> Path:
    with path.open("wb") as out:
        for _ in range(size // (16 * MiB)):
            out.write(os.urandom(16 * MiB))
    return path


def _run(source: Path, address: str, case: Case, cert_pem: str | None) -> None:
    """One timed sync through the proxy, added to ``case`` (the digests checked after)."""
    from siterecovery.agent.tls import client_context
    from siterecovery.disk.digest import disk_digest
    from siterecovery.disk.file import FileDevice
    from siterecovery.replication.sync import SyncMode, SyncOptions, sync
    from siterecovery.wire.client import RemoteDevice

    tls = client_context(cert_pem) if cert_pem else None
    options = SyncOptions(SyncMode.FULL, threads=1, flush=False)
    marks: dict[float, float] = {}

    def progress(done: int, total: int) -> None:
        for share in (0.25, 0.75):
            if total and done >= share * total:
                marks.setdefault(share, time.perf_counter())

    with FileDevice.open(source) as src, RemoteDevice.connect(
        address, size=src.size, window=case.window, tls=tls
    ) as dst:  # fmt: skip
        began = time.perf_counter()
        sync(src, dst, options, progress=progress)
        case.seconds.append(time.perf_counter() - began)
        case.steady.append(src.size / 2 / MiB / (marks[0.75] - marks[0.25]))
        if dst.disk_digest() != disk_digest(src):
            raise RuntimeError(f"{case.label}: the target differs from the source")


def _markdown(cases: list[Case], size: int, runs: int, took: float) -> str:
    lines = [
        f"Medians of {runs} interleaved run(s); {size // MiB} MiB random source, threads=1 "
        f"(one data connection), delaying TCP proxy; bench took {took:.0f} s.",
        "",
        "MiB/s: the whole sync (source bytes / seconds, with the data connection's "
        "handshake and the last window's drain); steady: its middle half (25% to 75% of "
        "the bytes). Ratios to the 0 ms case of the same transport and window.",
        "",
        "| transport | window | RTT | MiB/s | vs 0 ms | steady MiB/s | vs 0 ms | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base: dict[tuple[bool, int], tuple[float, float]] = {}
    for case in cases:
        rate = size / MiB / statistics.median(case.seconds)
        steady = statistics.median(case.steady)
        zero = base.setdefault((case.tls, case.window), (rate, steady))
        ratio, steady_ratio = rate / zero[0], steady / zero[1]
        goal = ""
        if case.window > 1 and case.rtt_ms:
            met = {name for name, r in (("sync", ratio), ("steady", steady_ratio)) if r >= TARGET}
            goal = f"≥ {TARGET:.0%}: " + (", ".join(sorted(met)) + " ok" if met else "missed")
        transport = "TLS" if case.tls else "TCP"
        lines.append(
            f"| {transport} | {case.window} | {case.rtt_ms} ms | {rate:.0f} | {ratio:.0%} "
            f"| {steady:.0f} | {steady_ratio:.0%} | {goal} |"
        )
    return "\n".join(lines)


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


class _Helper:
    """A receiver or proxy in a process of its own (this module), and where it listens."""

    def __init__(self, process: subprocess.Popen[str], address: str) -> None:
        self.process = process
        self.address = address

    @classmethod
    def start(cls, *args: str) -> _Helper:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.wire_wan", *args],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert process.stderr is not None
        line = process.stderr.readline()
        if not line.startswith("listening on "):
            process.kill()
            raise RuntimeError(f"helper {args} did not start: {line}{process.stderr.read()}")
        return cls(process, line.split()[-1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()


# The helpers' sides.


def _serve(target: Path, tls_dir: str | None) -> int:
    """A Receiver of ``target`` (TLS with the identity in ``tls_dir``) until SIGTERM."""
    from contextlib import ExitStack

    from siterecovery.agent.tls import make_identity, server_context
    from siterecovery.disk.open import open_target
    from siterecovery.wire import address
    from siterecovery.wire.server import Receiver

    tls = server_context(make_identity(Path(tls_dir), "receiver")) if tls_dir else None
    with ExitStack() as stack:
        listener, bound = address.listen(address.parse("tcp://127.0.0.1:0"))
        stack.callback(listener.close)
        receiver = Receiver(lambda size: open_target(str(target), stack, size=size), tls=tls)
        stack.callback(receiver.close)
        signal.signal(signal.SIGTERM, lambda *_: receiver.stop())
        print(f"listening on {bound}", file=sys.stderr, flush=True)
        receiver.serve(listener)
    return 0


def _proxy(upstream: str, delay_ms: float) -> int:
    """A delaying TCP proxy to ``upstream`` until SIGTERM."""
    from siterecovery.wire import address

    listener, bound = address.listen(address.parse("tcp://127.0.0.1:0"))
    proxy = DelayingProxy(address.parse(upstream), delay_ms / 1000)
    signal.signal(signal.SIGTERM, lambda *_: proxy.stop(listener))
    print(f"listening on {bound}", file=sys.stderr, flush=True)
    proxy.serve(listener)
    return 0


class DelayingProxy:
    """Forwards both directions of every connection, each chunk ``delay`` seconds after
    it was read, in order.

    Per direction a reader thread timestamps what it reads into an unbounded
    queue and never waits; a writer thread sends each chunk when it is due,
    then gives its buffer back for reuse (fresh 1 MiB buffers cost page
    faults). So the proxy adds ``delay`` one way and no bandwidth limit of
    its own.
    """

    def __init__(self, upstream: object, delay: float) -> None:
        self._upstream = upstream
        self._delay = delay
        self._stopping = threading.Event()

    def serve(self, listener: socket.socket) -> None:
        from siterecovery.wire import address

        while not self._stopping.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                break
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = address.dial(self._upstream)  # type: ignore[arg-type]
            for source, sink in ((client, server), (server, client)):
                self._direction(source, sink)

    def stop(self, listener: socket.socket) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()

    def _direction(self, source: socket.socket, sink: socket.socket) -> None:
        chunks: queue.SimpleQueue[tuple[float, bytearray, int]] = queue.SimpleQueue()
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()  # Reused: no page faults.

        def read() -> None:
            try:
                while True:
                    try:
                        buf = free.get_nowait()
                    except queue.Empty:
                        buf = bytearray(CHUNK)
                    if not (n := source.recv_into(buf)):
                        break
                    chunks.put((time.monotonic() + self._delay, buf, n))
            except OSError:
                pass
            chunks.put((time.monotonic() + self._delay, bytearray(), 0))

        def write() -> None:
            try:
                while True:
                    due, buf, n = chunks.get()
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    if not n:
                        sink.shutdown(socket.SHUT_WR)
                        return
                    sink.sendall(memoryview(buf)[:n])
                    free.put(buf)
            except OSError:
                with contextlib.suppress(OSError):
                    source.shutdown(socket.SHUT_RDWR)

        for target in (read, write):
            threading.Thread(target=target, daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
