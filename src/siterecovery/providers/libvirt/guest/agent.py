"""The agent of the lab's real guest: the journal workload on its disk, and a
qemu guest agent on the virtio-serial port ``org.qemu.guest_agent.0``.

The guest's ``init`` runs it with Debian's python3.11, which holds only the
standard library, numpy, xxhash and the siterecovery modules the workload
imports (see :mod:`siterecovery.providers.libvirt.guest_image`). It

- starts the workload (:mod:`siterecovery.providers.local.workload`) on the
  disk with ``--format`` (a journal already there is continued, with its own
  seed), its control socket and state file in ``/run/sr``;
- prints ``sr-workload seq=N`` on the console whenever the acknowledged seq
  changes, at most 4 times a second (``sr-workload seq=N frozen`` while frozen);
- answers the qemu guest agent protocol: requests are JSON objects
  (``{"execute": NAME, "arguments": {...}, "id": ...}``), each reply one JSON
  object and a newline; a 0xFF byte resets the parser. Commands:
  ``guest-sync``, ``guest-sync-delimited`` (its reply preceded by 0xFF),
  ``guest-ping``, ``guest-info``, ``guest-fsfreeze-status``,
  ``guest-fsfreeze-freeze`` and ``-freeze-list`` (the workload's quiesce: the
  record in flight completes and is flushed, then nothing is written until the
  thaw; returns 1, the one "file system"), ``guest-fsfreeze-thaw`` (returns 1,
  or 0 when not frozen), ``guest-shutdown`` (no reply, as qemu-ga: the workload
  stops after its record, the disk is synced, the guest powers off or reboots)
  and ``sr-status`` (the workload's control-socket status, ``seq`` the last
  acknowledged record). While frozen, only the commands qemu-ga allows then
  are answered; the others get ``CommandNotFound`` "has been disabled".

Kernel command line: ``sr.rate=R`` (records per second, default 20),
``sr.seed=N`` (seed of a journal formatted now), ``sr.disk=PATH`` (default
``/dev/vda``), ``sr.freeze_timeout=S`` (a freeze thaws by itself after S
seconds, default 600: a host that dies never freezes the guest for good).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from siterecovery import __version__
from siterecovery.domain.errors import GuestError
from siterecovery.providers.local.guest import (
    DEFAULT_RATE,
    STOP_TIMEOUT,
    WorkloadControl,
    read_state,
)

AGENT_PORT = "org.qemu.guest_agent.0"
RUN_DIR = Path("/run/sr")
CONTROL = RUN_DIR / "control.sock"
STATE = RUN_DIR / "state.json"
REBOOT_FLAG = RUN_DIR / "reboot"
"""Left for ``init`` by ``guest-shutdown`` with ``"mode": "reboot"``."""
PROGRESS_INTERVAL = 0.25
"""Seconds between two looks at the workload's state file."""

_PORTS = Path("/sys/class/virtio-ports")
_WAIT_DEVICE = 30.0
_MAX_REQUEST = 64 * 1024
_DELIMITER = 0xFF
_HUP_PAUSE = 0.2
_POLL_MS = 500
_WHILE_FROZEN = frozenset(
    {
        "guest-sync",
        "guest-sync-delimited",
        "guest-ping",
        "guest-info",
        "guest-fsfreeze-status",
        "guest-fsfreeze-thaw",
        "sr-status",
    }
)


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """What the kernel command line asks of the guest."""

    rate: float = DEFAULT_RATE
    seed: int | None = None
    disk: str = "/dev/vda"
    freeze_timeout: float = 600.0


def parse_cmdline(text: str) -> GuestConfig:
    """The ``sr.*`` options of a kernel command line; unknown ones are ignored.

    Raises ValueError when a value does not parse.
    """
    found = dict(word[3:].partition("=")[::2] for word in text.split() if word.startswith("sr."))
    defaults = GuestConfig()
    return GuestConfig(
        rate=float(found.get("rate", defaults.rate)),
        seed=int(found["seed"]) if found.get("seed") else None,
        disk=found.get("disk") or defaults.disk,
        freeze_timeout=float(found.get("freeze_timeout", defaults.freeze_timeout)),
    )


# The protocol ----------------------------------------------------------------


class Control(Protocol):
    """What the responder needs of the workload (a :class:`WorkloadControl`)."""

    def quiesce(self, timeout: float = ...) -> int: ...

    def thaw(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class AgentError(Exception):
    """A command failed: the reply is ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class Splitter:
    """Cuts the agent's input stream into JSON objects (qemu-ga's lexer, cut down).

    0xFF resets it (clients send one before ``guest-sync-delimited``); bytes
    between objects are skipped. An object over 64 KiB comes out as ``b""``.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False

    def reset(self) -> None:
        self._buf.clear()
        self._depth, self._in_string, self._escape = 0, False, False

    def feed(self, data: bytes) -> list[bytes]:
        """The objects completed by ``data``, in order."""
        done: list[bytes] = []
        for byte in data:
            if byte == _DELIMITER:
                self.reset()
            elif self._depth or byte == ord("{"):
                self._buf.append(byte)
                self._step(byte, done)
        return done

    def _step(self, byte: int, done: list[bytes]) -> None:
        if self._escape:
            self._escape = False
        elif self._in_string:
            self._escape = byte == ord("\\")
            self._in_string = byte != ord('"')
        elif byte == ord('"'):
            self._in_string = True
        elif byte in b"{[":
            self._depth += 1
        elif byte in b"}]":
            self._depth -= 1
        if self._depth == 0:
            done.append(bytes(self._buf))
            self.reset()
        elif len(self._buf) > _MAX_REQUEST:
            done.append(b"")
            self.reset()


class Responder:
    """Answers guest agent requests from the workload's control socket.

    Thread-compatible, not thread-safe: one channel calls :meth:`reply`.
    ``on_shutdown(mode)`` is called once a ``guest-shutdown`` was accepted.
    """

    def __init__(
        self, control: Control, *, freeze_timeout: float, on_shutdown: Callable[[str], None]
    ) -> None:
        self._control = control
        self._freeze_timeout = freeze_timeout
        self._on_shutdown = on_shutdown
        self._commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "guest-sync": self._sync,
            "guest-sync-delimited": self._sync,
            "guest-ping": lambda args: {},
            "guest-info": self._info,
            "guest-fsfreeze-status": lambda args: "frozen" if self._frozen() else "thawed",
            "guest-fsfreeze-freeze": self._freeze,
            "guest-fsfreeze-freeze-list": self._freeze,
            "guest-fsfreeze-thaw": self._thaw,
            "guest-shutdown": self._shutdown,
            "sr-status": lambda args: self._control.status(),
        }

    def reply(self, raw: bytes) -> bytes | None:
        """The bytes to send back for one request object (None: no reply)."""
        request: Any = None
        try:
            request = _parse(raw)
            name = request["execute"]
            result = self._run(name, request.get("arguments") or {})
        except AgentError as e:
            reply: dict[str, Any] = {"error": {"class": e.error_class, "desc": e.desc}}
        else:
            if name == "guest-shutdown":
                return None
            reply = {"return": result}
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        prefix = b"\xff" if isinstance(request, dict) and _delimited(request) else b""
        return prefix + json.dumps(reply).encode() + b"\n"

    def _run(self, name: str, arguments: dict[str, Any]) -> Any:
        command = self._commands.get(name)
        if command is None:
            raise AgentError(f"The command {name} has not been found", "CommandNotFound")
        if name not in _WHILE_FROZEN and self._frozen():
            raise AgentError(
                f"Command {name} has been disabled: the agent is in frozen state",
                "CommandNotFound",
            )
        try:
            return command(arguments)
        except GuestError as e:
            raise AgentError(str(e)) from e
        except (KeyError, TypeError, ValueError) as e:
            raise AgentError(f"invalid arguments for {name}: {e!r}", "GenericError") from e

    def _frozen(self) -> bool:
        try:
            return bool(self._control.status()["paused"])
        except GuestError:
            return False  # No workload: nothing is frozen.

    def _sync(self, arguments: dict[str, Any]) -> Any:
        return arguments["id"]

    def _info(self, arguments: dict[str, Any]) -> dict[str, Any]:
        commands = [
            {"name": name, "enabled": True, "success-response": name != "guest-shutdown"}
            for name in sorted(self._commands)
        ]
        return {"version": f"siterecovery-{__version__}", "supported_commands": commands}

    def _freeze(self, arguments: dict[str, Any]) -> int:
        self._control.quiesce(self._freeze_timeout)
        return 1

    def _thaw(self, arguments: dict[str, Any]) -> int:
        frozen = self._frozen()
        self._control.thaw()
        return 1 if frozen else 0

    def _shutdown(self, arguments: dict[str, Any]) -> None:
        mode = arguments.get("mode", "powerdown")
        if mode not in ("powerdown", "halt", "reboot"):
            raise AgentError(f"unknown shutdown mode {mode!r}", "InvalidParameter")
        self._on_shutdown(mode)


def _parse(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise AgentError(f"request larger than {_MAX_REQUEST} bytes")
    try:
        request = json.loads(raw)
    except ValueError as e:
        raise AgentError(f"JSON parse error, {e}") from e
    if not isinstance(request, dict) or not isinstance(request.get("execute"), str):
        raise AgentError("QMP input lacks member 'execute'")
    return request


def _delimited(request: dict[str, Any]) -> bool:
    return request.get("execute") == "guest-sync-delimited"


# The guest side of the virtio-serial port ---------------------------------------


def find_port(name: str = AGENT_PORT, ports: Path = _PORTS) -> Path | None:
    """The character device of the virtio-serial port called ``name`` (None: none)."""
    for entry in sorted(ports.glob("*")):
        with contextlib.suppress(OSError):
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
    return None


def serve_port(path: Path, responder: Responder, done: Callable[[], bool]) -> None:
    """Answer requests on the port at ``path`` until ``done()``.

    While no host end is connected the port reports a hang-up: input is then
    dropped (a half-read request of a client gone) and replies are lost.
    """
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        splitter = Splitter()
        while not done():
            if not poller.poll(_POLL_MS):
                continue
            data = _read(fd)
            if not data:
                splitter.reset()
                time.sleep(_HUP_PAUSE)
                continue
            for raw in splitter.feed(data):
                _send(fd, responder.reply(raw))
    finally:
        os.close(fd)


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""


def _send(fd: int, reply: bytes | None) -> None:
    view = memoryview(reply or b"")
    with contextlib.suppress(OSError):  # The host end went away: the reply is lost.
        while view:
            view = view[os.write(fd, view) :]


# The workload and the console ---------------------------------------------------


class WorkloadProcess:
    """The workload, a child process writing the journal on the guest's disk."""

    def __init__(self, config: GuestConfig) -> None:
        argv = [
            sys.executable, "-S", "-m", "siterecovery.providers.local.workload",
            "--device", config.disk, "--control", str(CONTROL), "--state", str(STATE),
            "--rate", repr(config.rate), "--format",
        ]  # fmt: skip
        argv += ["--seed", str(config.seed)] if config.seed is not None else []
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def exit_status(self) -> int | None:
        return self._process.poll()

    def stop(self) -> int:
        """SIGTERM: it finishes its record, saves its state and exits (SIGKILL after
        STOP_TIMEOUT). Returns its exit status."""
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signal.SIGTERM)
        try:
            return self._process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return self._process.wait()


def report_progress(workload: WorkloadProcess, done: threading.Event) -> None:
    """Print ``sr-workload seq=N`` when the acknowledged seq (or frozen) changes."""
    shown: tuple[int, bool] | None = None
    while not done.wait(PROGRESS_INTERVAL):
        with contextlib.suppress(GuestError, KeyError, TypeError, ValueError):
            state = read_state(STATE)
            now = (int(state["seq"]), bool(state["paused"]))
            if now != shown:
                print(f"sr-workload seq={now[0]}{' frozen' if now[1] else ''}", flush=True)
                shown = now
        if (code := workload.exit_status()) is not None:
            print(f"sr-workload exited with status {code}", flush=True)
            return


def _wait_for(find: Callable[[], Path | None], timeout: float) -> Path | None:
    """The path ``find()`` gives, once it exists (None after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while (found := find()) is None or not found.exists():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    return found


def main() -> int:
    """Run the guest until ``guest-shutdown``: 0 (then ``init`` powers off)."""
    config = parse_cmdline(Path("/proc/cmdline").read_text())
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    if _wait_for(lambda: Path(config.disk), _WAIT_DEVICE) is None:
        print(f"sr-agent: no disk {config.disk}", flush=True)
        return 1
    workload = WorkloadProcess(config)
    done, asked = threading.Event(), list[str]()
    threading.Thread(target=report_progress, args=(workload, done), daemon=True).start()
    responder = Responder(
        WorkloadControl(CONTROL, timeout=10.0),
        freeze_timeout=config.freeze_timeout,
        on_shutdown=asked.append,
    )
    port = _wait_for(find_port, _WAIT_DEVICE)
    print(f"sr-agent: {__version__} up, guest agent on {port}, rate {config.rate}", flush=True)
    if port is None:
        done.wait()  # No channel: run until the machine is killed.
    else:
        serve_port(port, responder, lambda: bool(asked))
    return _shut_down(workload, done, asked[0])


def _shut_down(workload: WorkloadProcess, done: threading.Event, mode: str) -> int:
    code = workload.stop()
    done.set()
    with contextlib.suppress(GuestError, KeyError):
        print(f"sr-workload stopped seq={read_state(STATE)['seq']} status={code}", flush=True)
    os.sync()
    if mode == "reboot":
        REBOOT_FLAG.touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
