"""Test double between a sender and a receiver: a real TCP proxy on loopback.

It forwards both directions in threads of the test process, keeps every
byte it forwarded (what an eavesdropper on the WAN would see) and can cut
one connection, once: the first to carry ``cut_after`` bytes from the
sender (a dropped WAN link). Every other connection passes untouched.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from siterecovery.wire import address

CHUNK = 256 * 1024


class Proxy:
    """Listens at :attr:`address`, forwards to ``upstream`` (``tcp://HOST:PORT``)."""

    def __init__(self, upstream: str, *, cut_after: int | None = None) -> None:
        self._upstream = address.parse(upstream)
        self._listener, bound = address.listen(address.parse("tcp://127.0.0.1:0"))
        self.address = str(bound)
        self._cut_after = cut_after
        self._lock = threading.Lock()
        self.recorded = bytearray()
        self.connections = 0
        self.cuts = 0
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # Closed.
            server = address.dial(self._upstream)
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            self._start(self._link, client, server)

    def _link(self, client: socket.socket, server: socket.socket) -> None:
        """Both directions; then close both ends (a reset when bytes were left unread)."""
        back = threading.Thread(target=self._pump, args=(server, client, False), daemon=True)
        back.start()
        self._pump(client, server, True)
        back.join()
        for sock in (client, server):
            sock.close()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        passed = 0
        try:
            while data := source.recv(CHUNK):
                cut = self._cut_after if upstream else None
                if cut is not None and passed + len(data) >= cut and self._take_cut():
                    sink.sendall(data[: cut - passed])
                    self._cut(source, sink)
                    return
                sink.sendall(data)
                passed += len(data)
                with self._lock:
                    self.recorded += data
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            self._cut(source, sink, counted=False)

    def _take_cut(self) -> bool:
        with self._lock:
            due, self._cut_after = self._cut_after is not None, None
        return due

    def _cut(self, a: socket.socket, b: socket.socket, *, counted: bool = True) -> None:
        """Stop both directions (the link then closes both ends: both peers see a reset)."""
        with self._lock:
            self.cuts += int(counted)
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # Wakes the accepting thread.
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
