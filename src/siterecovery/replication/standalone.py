"""Standalone syncs between images, NBD exports and receivers (no vault, no daemon).

What ``siterecovery sync`` and ``siterecovery sync-receive`` do, as functions
the CLI, the benchmark and the tests call alike:

* :func:`run_sync` opens the source and the target (a disk, or a receiver at
  ``tcp://`` / ``unix:``), runs the engine, then compares whole-disk digests
  computed where each disk lives (only the digests cross), and reports.
* :class:`ReceiveSession` listens for senders and applies their syncs to one
  target disk (created at the source's size when missing).

Over the wire, checkpoints are marked at the receiver under a job name made
of the mode, the source and its size: ``resume=True`` restarts from the
receiver's last mark of the same job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.open import (
    NBD_SCHEME,
    image_format,
    new_image_format,
    open_source,
    open_target,
    virtual_size,
)
from siterecovery.domain.errors import DiskError, IntegrityError, InvalidInput
from siterecovery.replication.options import SyncMode, SyncOptions, SyncResult
from siterecovery.wire import address as addresses

if TYPE_CHECKING:
    # Loaded when used: a local sync needs neither keys nor the wire, and a copy
    # offloaded to qemu-img without --verify needs neither the engine nor numpy.
    from siterecovery.keys import SecretKey
    from siterecovery.replication.sync import Cancelled, Progress


@dataclass(frozen=True, slots=True)
class SyncRequest:
    """One standalone sync. ``options.resume_offset`` and ``target_is_blank`` are
    decided here (from ``resume`` and from whether the target was created)."""

    source: str
    target: str
    options: SyncOptions
    compress: bool = False
    key: SecretKey | None = None
    resume: bool = False
    verify: bool = True

    def __post_init__(self) -> None:
        remote = addresses.is_address(self.target)
        if (self.compress or self.key or self.resume) and not remote:
            raise InvalidInput(
                field="target",
                reason="--compress, --key and --resume apply to receivers (tcp:// or unix:)",
            )
        if addresses.is_address(self.source):
            raise InvalidInput(field="source", reason="a receiver can only be the target")


def run_sync(
    request: SyncRequest, *, progress: Progress | None = None, cancelled: Cancelled | None = None
) -> dict[str, Any]:
    """Run ``request``; the report (see ``siterecovery sync --help``).

    Raises IntegrityError when the final digests differ, SyncCancelled when
    ``cancelled()`` said so, or the first error of the engine.
    """
    offloaded = _offload(request, progress, cancelled)
    if offloaded is not None and not request.verify:
        return _report(request, offloaded, offloaded.bytes_written, None, wire=None)
    from siterecovery.disk.digest import disk_digest
    from siterecovery.replication.sync import sync

    with ExitStack() as stack:
        src = open_source(request.source, stack)
        if addresses.is_address(request.target):
            return _to_receiver(request, src, stack, progress, cancelled)
        dst, created = open_target(request.target, stack, size=src.size)
        if offloaded is None:
            options = replace(request.options, target_is_blank=created)
            result = sync(src, dst, options, progress=progress, cancelled=cancelled)
        else:
            result = offloaded
        digests = _digests(src, lambda: disk_digest(dst)) if request.verify else None
        return _report(request, result, result.bytes_written, digests, wire=None)


def _offload(
    request: SyncRequest, progress: Progress | None, cancelled: Cancelled | None
) -> SyncResult | None:
    """A full copy between two local images, one of them not raw, done by QEMU
    (``replication/offload.py``); None when the engine should do it."""
    if request.options.mode is not SyncMode.FULL or request.options.resume_offset:
        return None
    specs = (request.source, request.target)
    if any(spec.startswith(NBD_SCHEME) or addresses.is_address(spec) for spec in specs):
        return None
    source, target = (Path(spec) for spec in specs)
    create = not target.exists()
    if not source.is_file() or not (create or target.is_file()):
        return None
    source_fmt = image_format(source)
    target_fmt = new_image_format(target) if create else image_format(target)
    if source_fmt == target_fmt == "raw":
        return None
    size = virtual_size(source, source_fmt)
    if not create and virtual_size(target, target_fmt) < size:
        raise DiskError(detail=f"the target {target} is smaller than the source ({size} bytes)")
    from siterecovery.replication.offload import copy_image

    return copy_image(
        (source, source_fmt),
        (target, target_fmt),
        create=create,
        flush=request.options.flush,
        progress=progress,
        cancelled=cancelled,
    )


def _to_receiver(
    request: SyncRequest,
    src: BlockDevice,
    stack: ExitStack,
    progress: Progress | None,
    cancelled: Cancelled | None,
) -> dict[str, Any]:
    from siterecovery.wire.client import RemoteDevice

    job = f"{request.options.mode}:{_identity(request.source)}:{src.size}"
    dst = RemoteDevice.connect(
        request.target, size=src.size, job=job, key=request.key, compress=request.compress
    )
    stack.callback(dst.close)
    welcome = dst.welcome
    resume = welcome.resume_offset if request.resume else 0
    options = replace(request.options, resume_offset=resume, target_is_blank=welcome.created)
    checkpoint = dst.mark if options.flush else None
    from siterecovery.replication.sync import sync

    result = sync(src, dst, options, progress=progress, checkpoint=checkpoint, cancelled=cancelled)
    digests = _digests(src, dst.disk_digest) if request.verify else None
    dst.done()
    counts = dst.counts
    wire = {
        "bytes_sent": counts.bytes_sent,
        "bytes_received": counts.bytes_received,
        "frames_resent": counts.frames_resent,
        "reconnects": counts.reconnects,
    }
    return _report(request, result, counts.bytes_sent, digests, wire=wire)


def _identity(spec: str) -> str:
    path = Path(spec)
    return str(path.resolve()) if path.exists() else spec


def _digests(src: BlockDevice, target_digest: Callable[[], str]) -> dict[str, str]:
    """Whole-disk digests of both sides, computed at the same time; equal or IntegrityError."""
    from concurrent.futures import ThreadPoolExecutor

    from siterecovery.disk.digest import disk_digest

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest") as pool:
        theirs = pool.submit(target_digest)
        ours = disk_digest(src)
        found = {"source": ours, "target": theirs.result()}
    if found["source"] != found["target"]:
        raise IntegrityError(what="the target", source=found["source"], target=found["target"])
    return found


def _report(
    request: SyncRequest,
    result: SyncResult,
    bytes_sent: int,
    digests: dict[str, str] | None,
    *,
    wire: dict[str, int] | None,
) -> dict[str, Any]:
    return {
        "source": request.source,
        "target": request.target,
        **result.to_dict(),
        "bytes_sent": bytes_sent,
        "digests": digests,
        "wire": wire,
    }


class ReceiveSession:
    """A receiver listening at ``listen`` for syncs into the disk ``target``.

    Use as a context manager (closes the target, a qsd it started, the
    socket). :meth:`serve` blocks until a job is done (``once``) or
    :meth:`stop`; :meth:`stop` may be called from a signal handler.
    """

    def __init__(
        self, target: str, listen: str, *, key: SecretKey | None = None, once: bool = True
    ) -> None:
        from siterecovery.wire.server import Receiver

        self._stack = ExitStack()
        self._target = target
        self._listener, where = addresses.listen(addresses.parse(listen))
        self._stack.callback(self._listener.close)
        self.address = str(where)
        self._receiver = Receiver(self._open, key=key, once=once)
        self._stack.callback(self._receiver.close)

    def _open(self, size: int) -> tuple[BlockDevice, bool]:
        return open_target(self._target, self._stack, size=size)

    def serve(self) -> dict[str, Any]:
        """Serve until done; a summary of what was received."""
        started = time.monotonic()
        self._receiver.serve(self._listener)
        counts = self._receiver.counts
        return {
            "listen": self.address,
            "target": self._target,
            "seconds": time.monotonic() - started,
            **{name: getattr(counts, name) for name in counts.__dataclass_fields__},
        }

    def stop(self) -> None:
        self._receiver.stop()

    def __enter__(self) -> ReceiveSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


__all__ = ["ReceiveSession", "SyncMode", "SyncRequest", "run_sync"]
