"""Disk image formats of other hypervisors, in and out (``vm import``, ``point export``).

Hyper-V's VHDX and VHD (qemu's ``vpc``) and VMware's VMDK come in and go out
through ``qemu-img convert``; nothing here parses them. An export is written
to ``FILE.partial`` and renamed when complete, never over an existing file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from siterecovery.disk import qemu_img
from siterecovery.domain.errors import AlreadyExists, InvalidInput


@dataclass(frozen=True, slots=True)
class Format:
    """``name`` as the user says it; qemu's driver and its ``-o`` options."""

    name: str
    driver: str
    options: tuple[str, ...] = ()


EXPORTS = {
    f.name: f
    for f in (
        Format("raw", "raw"),
        Format("qcow2", "qcow2"),
        Format("vhdx", "vhdx"),
        # VHD: the exact virtual size, not one rounded to a CHS geometry.
        Format("vpc", "vpc", ("force_size=on",)),
        Format("vmdk", "vmdk"),
        Format("vmdk-stream", "vmdk", ("subformat=streamOptimized",)),
    )
}
"""What ``point export --format`` writes."""

IMPORTS = ("vhdx", "vpc", "vmdk", "qcow2", "raw")
"""What ``vm import --disk`` reads (qemu's names: ``vpc`` is VHD)."""


def export_format(name: str) -> Format:
    try:
        return EXPORTS[name]
    except KeyError:
        raise InvalidInput(
            field="format", reason=f"'{name}' is not one of {', '.join(EXPORTS)}"
        ) from None


SUFFIXES = {".vhdx": "vhdx", ".vhd": "vpc", ".vmdk": "vmdk", ".qcow2": "qcow2"}
"""What a file's name says it is: qemu-img must read it as that."""

MIN_IMPORT = 1 << 20
"""Bytes: a smaller image is no VM's disk (any file reads as raw)."""


def detect(path: Path) -> str:
    """The format of an image to import (InvalidInput when not one we take, when
    it is not what its name says, or a raw file that cannot be a disk)."""
    if not path.is_file():
        raise InvalidInput(field="disk", reason=f"{path} is not a file at the site's agent")
    info = qemu_img.info(path)
    found = str(info.get("format", ""))
    if found not in IMPORTS:
        reason = f"{path} is {found or 'not an image'}; take {', '.join(IMPORTS)}"
        raise InvalidInput(field="disk", reason=reason)
    named = SUFFIXES.get(path.suffix.lower())
    if named is not None and named != found:
        reason = f"{path} is named {path.suffix} but qemu-img reads it as {found}: not a {named}"
        raise InvalidInput(field="disk", reason=reason)
    size = int(info.get("virtual-size", 0))
    if size < MIN_IMPORT or size % 512:
        reason = f"{path} holds {size} bytes: a disk is at least 1 MiB of whole 512-byte sectors"
        raise InvalidInput(field="disk", reason=reason)
    return found


def check_new(path: Path) -> None:
    """``path`` may be written: absolute, in an existing directory, not there yet."""
    if not path.is_absolute():
        raise InvalidInput(field="to", reason=f"{path} is not an absolute path")
    if not path.parent.is_dir():
        raise InvalidInput(field="to", reason=f"{path.parent} is not a directory")
    if path.exists():
        raise AlreadyExists(kind="file", name=str(path))


def write_image(src: Path, src_fmt: str, dst: Path, fmt: Format) -> None:
    """``src`` (its whole chain) converted to ``dst``, which appears only complete."""
    check_new(dst)
    partial = dst.with_name(dst.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        qemu_img.convert(src, partial, src_fmt=src_fmt, dst_fmt=fmt.driver, options=fmt.options)
        partial.rename(dst)
    finally:
        partial.unlink(missing_ok=True)
