"""A small QMP (QEMU Machine Protocol) client over a unix socket.

One JSON object per line each way. Commands carry an ``id`` so their reply is
told apart from asynchronous events, which are buffered until
:meth:`QmpClient.wait_event` takes them. The client has no reader thread: the
socket is read only while a caller waits for a reply or an event.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from siterecovery.domain.errors import DiskError, QmpError

DEFAULT_TIMEOUT = 30.0
"""Seconds to wait for a reply before giving up."""

_MAX_BUFFERED_EVENTS = 1000

Event = dict[str, Any]
EventPredicate = Callable[[dict[str, Any]], bool]


class QmpClient:
    """A negotiated QMP session. Thread-safe: one command at a time, under a lock."""

    def __init__(self, sock: socket.socket, path: Path, timeout: float) -> None:
        self._sock: socket.socket | None = sock
        self._path = path
        self._timeout = timeout
        self._lock = threading.RLock()
        self._pending = bytearray()
        self._events: deque[Event] = deque(maxlen=_MAX_BUFFERED_EVENTS)
        self._next_id = 0

    @classmethod
    def connect(cls, socket_path: Path | str, timeout: float = DEFAULT_TIMEOUT) -> QmpClient:
        """Connect, read the greeting and negotiate capabilities."""
        path = Path(socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            raise DiskError(detail=f"cannot connect to QMP at {path}: {e.strerror or e}") from e
        client = cls(sock, path, timeout)
        try:
            client._read_greeting()
            client.execute("qmp_capabilities")
        except DiskError:
            client.close()
            raise
        return client

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        """Whether the client was closed or the daemon closed the connection."""
        return self._sock is None

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value.

        Arguments whose names have dashes are passed as a dict:
        ``execute("blockdev-add", **{"node-name": "n0", ...})``. Raises
        :class:`QmpError` when qemu refuses the command, :class:`DiskError`
        when the connection fails or no reply comes in time.
        """
        with self._lock:
            self._next_id += 1
            request_id = f"sr-{self._next_id}"
            message: dict[str, Any] = {"execute": command, "id": request_id}
            if arguments:
                message["arguments"] = arguments
            self._send(message)
            reply = self._await_reply(request_id, time.monotonic() + self._timeout)
        if "error" in reply:
            error = reply["error"]
            raise QmpError(command=command, error_class=error.get("class"), desc=error.get("desc"))
        return reply.get("return")

    def wait_event(
        self, name: str, predicate: EventPredicate | None = None, timeout: float | None = None
    ) -> Event:
        """Take the first buffered or incoming event ``name`` whose data satisfies
        ``predicate``; raise DiskError after ``timeout`` seconds (default: the
        client's timeout). Matched events leave the buffer; others stay.
        Holds the client's lock while it waits: other threads' commands wait too.
        """
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        with self._lock:
            while True:
                event = self._take_event(name, predicate)
                if event is not None:
                    return event
                self._events.append(self._read_message(deadline))

    def clear_events(self) -> None:
        """Forget every buffered event."""
        with self._lock:
            self._events.clear()

    def close(self) -> None:
        """Close the socket. Idempotent."""
        with self._lock:
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_event(self, name: str, predicate: EventPredicate | None) -> Event | None:
        for event in self._events:
            if event.get("event") == name and (predicate is None or predicate(event["data"])):
                self._events.remove(event)
                return event
        return None

    def _read_greeting(self) -> None:
        try:
            self._read_message(time.monotonic() + self._timeout)
        except DiskError as e:
            raise DiskError(
                detail=f"QMP at {self._path} sent no greeting (a qemu monitor serves one "
                f"client at a time: another one may hold it): {e}"
            ) from e

    def _await_reply(self, request_id: str, deadline: float) -> dict[str, Any]:
        while True:
            message = self._read_message(deadline)
            if message.get("id") == request_id:
                return message
            if "event" in message:
                self._events.append(message)

    def _send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        try:
            self._socket().sendall(data)
        except OSError as e:
            raise DiskError(detail=f"cannot send to QMP at {self._path}: {e}") from e

    def _read_message(self, deadline: float) -> dict[str, Any]:
        """The next JSON object from the socket; DiskError after ``deadline``."""
        while b"\n" not in self._pending:
            self._receive(deadline)
        line, _, rest = self._pending.partition(b"\n")
        self._pending = bytearray(rest)
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError as e:
            raise DiskError(detail=f"bad QMP message from {self._path}: {line!r}") from e
        if "event" in message:
            message.setdefault("data", {})
        return message

    def _receive(self, deadline: float) -> None:
        sock = self._socket()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DiskError(detail=f"QMP at {self._path} did not answer in time")
        try:
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
        except TimeoutError as e:
            raise DiskError(detail=f"QMP at {self._path} did not answer in time") from e
        except OSError as e:
            raise DiskError(detail=f"cannot read QMP at {self._path}: {e}") from e
        if not chunk:
            self.close()
            raise DiskError(detail=f"QMP at {self._path} closed the connection")
        self._pending += chunk

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise DiskError(detail=f"QMP client for {self._path} is closed")
        return self._sock
