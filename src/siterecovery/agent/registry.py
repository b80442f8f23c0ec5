"""The operations an agent offers: a small registry the engine calls by name.

An operation is a function of the decoded JSON arguments (a ``dict``)
returning a JSON-able result. A *streaming* operation also receives
``emit(event)``, which sends one JSON-able event (progress...) to the caller
at once; when the caller has gone away, ``emit`` raises SyncCancelled, so a
long operation that emits stops at its next event. Operations run in worker
threads of the agent (several at a time): they must be thread-safe.
A :class:`SiteRecoveryError` they raise reaches the caller as the same class
(by its code); any other exception as ``INTERNAL``.

::

    ops = Operations()

    @ops.unary("vm.stop")
    def stop(args: dict[str, Any]) -> Any: ...

    @ops.streaming("disk.send")
    def send(args: dict[str, Any], emit: Emit) -> Any: ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from siterecovery.domain.errors import AlreadyExists

Args = dict[str, Any]
Emit = Callable[[dict[str, Any]], None]
Unary = Callable[[Args], Any]
Streaming = Callable[[Args, Emit], Any]


class Kind(StrEnum):
    UNARY = "unary"
    STREAMING = "streaming"


@dataclass(frozen=True, slots=True)
class Operation:
    """One named operation: ``function(args)`` or, streaming, ``function(args, emit)``."""

    name: str
    kind: Kind
    function: Callable[..., Any]

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "kind": str(self.kind)}


class Operations(Mapping[str, Operation]):
    """Operations by name; registered with the :meth:`unary` and :meth:`streaming`
    decorators (a name is registered once). Not meant to change once served."""

    def __init__(self) -> None:
        self._ops: dict[str, Operation] = {}

    def unary(self, name: str) -> Callable[[Unary], Unary]:
        def register(function: Unary) -> Unary:
            self.add(Operation(name, Kind.UNARY, function))
            return function

        return register

    def streaming(self, name: str) -> Callable[[Streaming], Streaming]:
        def register(function: Streaming) -> Streaming:
            self.add(Operation(name, Kind.STREAMING, function))
            return function

        return register

    def add(self, operation: Operation) -> None:
        if operation.name in self._ops:
            raise AlreadyExists(kind="operation", name=operation.name)
        self._ops[operation.name] = operation

    def __getitem__(self, name: str) -> Operation:
        return self._ops[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ops)

    def __len__(self) -> int:
        return len(self._ops)
