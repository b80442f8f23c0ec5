"""A small QMP (QEMU Machine Protocol) client over a unix socket.

One JSON object per line each way. Commands carry an ``id`` so their reply is
told apart from asynchronous events, which are buffered until
:meth:`QmpClient.wait_event` takes them. The client has no reader thread: the
socket is read only while a caller waits for a reply or an event.

Timeouts are generous (a loaded host may leave qemu's main loop busy for many
seconds) and every timeout names the process that did not answer. Idempotent
commands (``query-*``) are sent again after a timeout: a late reply to the
first request carries an older ``id`` and is dropped.
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

from siterecovery.domain.errors import DiskError, QmpError, QmpTimeout

DEFAULT_TIMEOUT = 60.0
"""Seconds to wait for one reply before giving up (or retrying an idempotent command)."""

IDEMPOTENT_ATTEMPTS = 3
"""How many times an idempotent command is sent before its timeout is an error."""

IDEMPOTENT_PREFIX = "query-"

_MAX_BUFFERED_EVENTS = 1000

Event = dict[str, Any]
EventPredicate = Callable[[dict[str, Any]], bool]


class _NoAnswer(Exception):
    """Nothing came from the socket before the deadline (internal)."""


class QmpClient:
    """A negotiated QMP session. Thread-safe: one command at a time, under a lock.

    ``name`` says which process serves the socket (e.g. ``qemu-storage-daemon
    pid 123``); error messages name it.
    """

    def __init__(self, sock: socket.socket, path: Path, timeout: float, name: str = "") -> None:
        self._sock: socket.socket | None = sock
        self._path = path
        self._timeout = timeout
        self._who = f"{name} (QMP at {path})" if name else f"QMP at {path}"
        self._lock = threading.RLock()
        self._pending = bytearray()
        self._events: deque[Event] = deque(maxlen=_MAX_BUFFERED_EVENTS)
        self._next_id = 0

    @classmethod
    def connect(
        cls, socket_path: Path | str, timeout: float = DEFAULT_TIMEOUT, *, name: str = ""
    ) -> QmpClient:
        """Connect, read the greeting and negotiate capabilities (``name``: see the class)."""
        path = Path(socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
        except OSError as e:
            sock.close()
            who = f"{name} (QMP at {path})" if name else f"QMP at {path}"
            raise DiskError(detail=f"cannot connect to {who}: {e.strerror or e}") from e
        client = cls(sock, path, timeout, name)
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

    def set_timeout(self, timeout: float) -> None:
        """Seconds to wait for each later reply (e.g. generous once negotiated)."""
        with self._lock:
            self._timeout = timeout

    @property
    def closed(self) -> bool:
        """Whether the client was closed or the daemon closed the connection."""
        return self._sock is None

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value.

        Arguments whose names have dashes are passed as a dict:
        ``execute("blockdev-add", **{"node-name": "n0", ...})``. Raises
        :class:`QmpError` when qemu refuses the command, :class:`DiskError`
        when the connection fails, :class:`QmpTimeout` (a DiskError) when no
        reply comes in time (an idempotent
        command is first sent :data:`IDEMPOTENT_ATTEMPTS` times).
        """
        attempts = IDEMPOTENT_ATTEMPTS if command.startswith(IDEMPOTENT_PREFIX) else 1
        for attempt in range(1, attempts + 1):
            try:
                reply = self._exchange(command, arguments)
                break
            except _NoAnswer:
                if attempt == attempts:
                    raise QmpTimeout(
                        detail=f"{self._who} did not answer '{command}' in time "
                        f"({self._timeout:g} s, {attempts} attempt{'s' if attempts > 1 else ''}): "
                        "the process is stopped, hung or starved of CPU"
                    ) from None
        if "error" in reply:
            error = reply["error"]
            raise QmpError(command=command, error_class=error.get("class"), desc=error.get("desc"))
        return reply.get("return")

    def _exchange(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._next_id += 1
            request_id = f"sr-{self._next_id}"
            message: dict[str, Any] = {"execute": command, "id": request_id}
            if arguments:
                message["arguments"] = arguments
            self._send(message)
            return self._await_reply(request_id, time.monotonic() + self._timeout)

    def wait_event(
        self, name: str, predicate: EventPredicate | None = None, timeout: float | None = None
    ) -> Event:
        """Take the first buffered or incoming event ``name`` whose data satisfies
        ``predicate``; raise DiskError after ``timeout`` seconds (default: the
        client's timeout). Matched events leave the buffer; others stay.
        Holds the client's lock while it waits: other threads' commands wait too.
        """
        seconds = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + seconds
        with self._lock:
            while True:
                event = self._take_event(name, predicate)
                if event is not None:
                    return event
                try:
                    self._events.append(self._read_message(deadline))
                except _NoAnswer:
                    raise DiskError(
                        detail=f"{self._who} sent no event {name} in time ({seconds:g} s)"
                    ) from None

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
        except _NoAnswer:
            raise QmpTimeout(
                detail=f"{self._who} sent no greeting within {self._timeout:g} s (a qemu "
                "monitor serves one client at a time: another one may hold it, or the "
                "process is stopped or hung)"
            ) from None

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
            raise DiskError(detail=f"cannot send to {self._who}: {e}") from e

    def _read_message(self, deadline: float) -> dict[str, Any]:
        """The next JSON object from the socket; _NoAnswer after ``deadline``."""
        while b"\n" not in self._pending:
            self._receive(deadline)
        line, _, rest = self._pending.partition(b"\n")
        self._pending = bytearray(rest)
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError as e:
            raise DiskError(detail=f"bad QMP message from {self._who}: {line!r}") from e
        if "event" in message:
            message.setdefault("data", {})
        return message

    def _receive(self, deadline: float) -> None:
        sock = self._socket()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _NoAnswer
        try:
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
        except TimeoutError:
            raise _NoAnswer from None
        except OSError as e:
            raise DiskError(detail=f"cannot read from {self._who}: {e}") from e
        if not chunk:
            self.close()
            raise DiskError(detail=f"{self._who} closed the connection (did the process exit?)")
        self._pending += chunk

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise DiskError(detail=f"QMP client for {self._who} is closed")
        return self._sock
