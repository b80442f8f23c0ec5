"""A tiny packet capture: an AF_PACKET raw socket on one interface, and TCP reassembly.

Run inside the namespace of the interface (tcpdump is not installed)::

    ip netns exec NS python capture.py IFACE OUT READY

It binds a ``SOCK_RAW`` / ``ETH_P_ALL`` socket to IFACE (every frame the
interface sends or receives, once), writes ``READY`` once bound, and appends
each frame to ``OUT`` until SIGTERM or SIGINT; then it writes ``OUT.json``:
``{"frames", "bytes", "drops"}`` (drops: the kernel's PACKET_STATISTICS).

``OUT`` is ``MAGIC`` then, per frame, ``<dII`` (time, pkttype, length) and the
frame. :func:`tcp_streams` reads it back: IPv4/TCP segments grouped by
direction (src, sport, dst, dport), each direction's payload put in sequence
order once (retransmits counted once), so a byte pattern split across two
segments is found in the stream; bytes never seen count as ``missing``.

Standard library only: it runs as a script with the venv's python.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

MAGIC = b"SRCAP1\n"
RECORD = struct.Struct("<dII")
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
SO_RCVBUFFORCE = 33
BUFFER = 1 << 18  # a GSO/GRO frame on a veth is up to 64 KiB


def capture(iface: str, out: Path, ready: Path) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    sock.bind((iface, 0))
    sock.settimeout(0.2)
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    buffer = bytearray(BUFFER)
    frames = total = 0
    with open(out, "wb") as handle:
        handle.write(MAGIC)
        ready.write_text(json.dumps({"iface": iface}) + "\n")
        while not stopping:
            try:
                n, address = sock.recvfrom_into(buffer)
            except TimeoutError:
                continue
            except InterruptedError:
                continue
            handle.write(RECORD.pack(time.time(), address[2], n))
            handle.write(memoryview(buffer)[:n])
            frames, total = frames + 1, total + n
    _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    summary = {"frames": frames, "bytes": total, "drops": drops}
    Path(f"{out}.json").write_text(json.dumps(summary) + "\n")


# -- reading a capture back -----------------------------------------------------------


def frames(path: Path) -> Iterator[tuple[float, int, bytes]]:
    """``(time, pkttype, frame)`` of every frame in the capture file."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path} is not a capture")
    at = len(MAGIC)
    while at + RECORD.size <= len(data):
        moment, kind, n = RECORD.unpack_from(data, at)
        at += RECORD.size
        yield moment, kind, data[at : at + n]
        at += n


@dataclass
class Stream:
    """One direction of one TCP connection, its payload in sequence order."""

    src: str
    sport: int
    dst: str
    dport: int
    segments: int = 0
    missing: int = 0
    data: bytes = field(default=b"", repr=False)
    _pieces: list[tuple[int, bytes]] = field(default_factory=list, repr=False)
    _base: int | None = field(default=None, repr=False)

    def add(self, seq: int, syn: bool, payload: bytes) -> None:
        if self._base is None:
            self._base = (seq + 1) % (1 << 32) if syn else seq
        if payload:
            relative = (seq - self._base) % (1 << 32)
            if relative >= 1 << 31:  # before the first segment seen (reordered)
                relative -= 1 << 32
            self._pieces.append((relative, payload))
            self.segments += 1

    def assemble(self) -> None:
        out = bytearray()
        end: int | None = None
        for start, payload in sorted(self._pieces, key=lambda p: p[0]):
            if end is None:
                end = start
            if start > end:
                self.missing += start - end
                end = start
            if start + len(payload) > end:
                out += payload[end - start :]
                end = start + len(payload)
        self.data = bytes(out)
        self._pieces.clear()


def tcp_streams(path: Path) -> list[Stream]:
    """Every TCP direction of the capture (IPv4 over Ethernet), reassembled."""
    streams: dict[tuple[str, int, str, int], Stream] = {}
    for _moment, _kind, frame in frames(path):
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[0] >> 4 != 4 or ip[9] != socket.IPPROTO_TCP:
            continue
        total = struct.unpack_from(">H", ip, 2)[0] or len(ip)
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack_from(">HHI", tcp, 0)
        offset = (tcp[12] >> 4) * 4
        syn = bool(tcp[13] & 0x02)
        key = (socket.inet_ntoa(ip[12:16]), sport, socket.inet_ntoa(ip[16:20]), dport)
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = Stream(*key)
        stream.add(seq, syn, tcp[offset:])
    for stream in streams.values():
        stream.assemble()
    return list(streams.values())


def summary(path: Path) -> dict[str, int]:
    found: dict[str, int] = json.loads(Path(f"{path}.json").read_text())
    return found


if __name__ == "__main__":
    capture(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
