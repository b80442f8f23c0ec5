"""Open the disks ``siterecovery sync`` names: image paths and NBD URLs.

* ``PATH`` of a raw image (or a block device): a :class:`FileDevice`.
* ``PATH`` of a qcow2, vhdx, vmdk or vpc image (recognised by its magic):
  served by a private qemu-storage-daemon (stopped when the stack closes)
  and opened over NBD.
* ``nbd+unix:///EXPORT?socket=PATH[&bitmap=NAME]``: an export of a running
  NBD server; ``bitmap`` makes its dirty extents available (``tracked``).

A missing target is created (raw, or qcow2 when its name ends in
``.qcow2``) at the source's size; it then reads as zeroes, which spares the
sync every zero write. Everything opened is closed by the caller's
:class:`~contextlib.ExitStack`, in reverse order. Receivers (``tcp://``,
``unix:``) are not disks: :mod:`siterecovery.wire` opens those.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.domain.errors import DiskError, InvalidInput

NBD_SCHEME = "nbd+unix://"
_MAGICS = (
    (b"QFI\xfb", "qcow2"),
    (b"vhdxfile", "vhdx"),
    (b"KDMV", "vmdk"),
    (b"# Disk DescriptorFile", "vmdk"),
    (b"conectix", "vpc"),
)
_NODE = "d0"


@dataclass(frozen=True, slots=True)
class NbdUrl:
    """A parsed ``nbd+unix:///EXPORT?socket=PATH[&bitmap=NAME]``."""

    export: str
    socket: Path
    bitmap: str | None = None


def parse_nbd_url(spec: str) -> NbdUrl:
    """Parse an ``nbd+unix://`` URL (the export name may be empty)."""
    parts = urlsplit(spec)
    query = parse_qs(parts.query)
    sockets = query.get("socket", [])
    if parts.scheme != "nbd+unix" or parts.netloc or len(sockets) != 1:
        raise InvalidInput(
            field="url", reason=f"'{spec}' is not nbd+unix:///EXPORT?socket=PATH[&bitmap=NAME]"
        )
    bitmap = query.get("bitmap", [None])[0]
    return NbdUrl(export=unquote(parts.path.lstrip("/")), socket=Path(sockets[0]), bitmap=bitmap)


def image_format(path: Path) -> str:
    """``raw`` or the qemu format of ``path``, from its first bytes."""
    try:
        with path.open("rb") as f:
            head = f.read(32)
    except OSError as e:
        raise DiskError(detail=f"cannot open {path}: {e.strerror or e}") from e
    return next((fmt for magic, fmt in _MAGICS if head.startswith(magic)), "raw")


def open_source(spec: str, stack: ExitStack) -> BlockDevice:
    """The disk ``spec`` names, read-only; closed by ``stack``."""
    return _open(spec, stack, writable=False)


def open_target(spec: str, stack: ExitStack, *, size: int) -> tuple[BlockDevice, bool]:
    """The disk ``spec`` names, writable, and whether it was created now.

    A missing image is created with ``size`` bytes (qcow2 when the name ends
    in ``.qcow2``, else raw); NBD exports must exist. Closed by ``stack``.
    """
    created = False
    if not spec.startswith(NBD_SCHEME) and not Path(spec).exists():
        create_image(Path(spec), size)
        created = True
    return _open(spec, stack, writable=True), created


def new_image_format(path: Path) -> str:
    """The format of a new image at ``path``: qcow2 for ``*.qcow2``, else raw."""
    return "qcow2" if path.suffix == ".qcow2" else "raw"


def create_image(path: Path, size: int) -> None:
    """A new image of ``size`` bytes reading as zeroes (see :func:`new_image_format`)."""
    if new_image_format(path) == "qcow2":
        from siterecovery.disk import qemu_img

        qemu_img.create(path, size)
    else:
        create_raw(path, size)


def _open(spec: str, stack: ExitStack, *, writable: bool) -> BlockDevice:
    # libnbd and the qsd machinery load only for the specs that need them.
    if spec.startswith(NBD_SCHEME):
        from siterecovery.disk.nbd import NbdDevice

        url = parse_nbd_url(spec)
        device: BlockDevice = NbdDevice.connect(
            url.socket, url.export, writable=writable, bitmap=url.bitmap
        )
    else:
        path = Path(spec)
        fmt = image_format(path)
        if fmt == "raw":
            device = FileDevice.open(path, writable=writable)
        else:
            device = _serve(path, fmt, stack, writable=writable)
    stack.callback(device.close)
    return device


def _serve(path: Path, fmt: str, stack: ExitStack, *, writable: bool) -> BlockDevice:
    """Serve ``path`` through a private qemu-storage-daemon; stopped by ``stack``."""
    from siterecovery.disk.nbd import NbdDevice
    from siterecovery.disk.qsd import DiskSpec, StorageDaemon

    run_dir = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))
    stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
    daemon = StorageDaemon.start(
        run_dir, [DiskSpec(_NODE, path, fmt=fmt, writable=writable)], detached=False
    )
    stack.callback(daemon.stop)
    return NbdDevice.connect(daemon.nbd_socket, _NODE, writable=writable)


def virtual_size(path: Path, fmt: str) -> int:
    """The size of the disk an image file holds (the file's size when raw; a
    qcow2 header's size field, big-endian u64 at byte 24; else ``qemu-img info``)."""
    if fmt == "raw":
        return path.stat().st_size
    if fmt == "qcow2":
        with path.open("rb") as f:
            header = f.read(32)
        if len(header) == 32:
            return int.from_bytes(header[24:32], "big")
    from siterecovery.disk import qemu_img

    return qemu_img.virtual_size(path)
