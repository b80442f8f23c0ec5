"""Typed wrappers over the ``qemu-img`` command line.

Each call runs one ``qemu-img`` process and waits for it. ``--output=json`` is
used wherever qemu-img has it, and ``-U`` (no image locking) for the read-only
queries ``info`` and ``map``, which may look at images a daemon has open. A
failure raises :class:`DiskError` carrying qemu-img's stderr. Backing files are
stored relative to the overlay's directory, so a chain directory can move.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siterecovery.disk.base import Extent
from siterecovery.domain.errors import DiskError, DiskFull

QEMU_IMG = "qemu-img"


@dataclass(frozen=True, slots=True)
class BitmapInfo:
    """A persistent dirty bitmap stored in a qcow2 image."""

    name: str
    granularity: int
    flags: tuple[str, ...]

    @property
    def in_use(self) -> bool:
        """Left ``in-use`` by a process that did not close the image cleanly
        (or that still has it open): its content cannot be trusted."""
        return "in-use" in self.flags

    @property
    def enabled(self) -> bool:
        """Recording writes (qemu calls this flag ``auto``)."""
        return "auto" in self.flags


def _run(*args: str) -> str:
    """Run qemu-img with ``args`` and return its stdout."""
    argv = [QEMU_IMG, *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as e:
        raise DiskError(detail=f"cannot run {QEMU_IMG}: {e}") from e
    if done.returncode != 0:
        if "No space left on device" in done.stderr:
            raise DiskFull(what=f"qemu-img {args[0]}", where=_written(args))
        raise DiskError(detail=f"qemu-img {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def _written(args: tuple[str, ...]) -> str:
    """The image a qemu-img command writes: its last argument naming a file."""
    paths = [a for a in args[1:] if not a.startswith("-") and ("/" in a or "." in a)]
    return paths[-1] if paths else "its image"


def _relative(backing: Path, overlay: Path) -> str:
    return os.path.relpath(Path(backing).absolute(), Path(overlay).absolute().parent)


def create(
    path: Path,
    size: int | None = None,
    *,
    fmt: str = "qcow2",
    backing: Path | None = None,
    backing_fmt: str = "qcow2",
) -> None:
    """Create an image of ``size`` bytes (default with a backing: its size).

    ``backing`` is recorded relative to ``path``'s directory.
    """
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", _relative(backing, path), "-F", backing_fmt]
    args.append(str(path))
    if size is not None:
        args.append(str(size))
    _run(*args)


def info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of one image (not its chain), as parsed JSON."""
    result: dict[str, Any] = json.loads(_run("info", "-U", "--output=json", str(path)))
    return result


def virtual_size(path: Path) -> int:
    """Virtual size of the image in bytes."""
    return int(info(path)["virtual-size"])


def backing_chain(path: Path) -> list[Path]:
    """The image and its backing files, top first, as absolute paths."""
    images = json.loads(_run("info", "-U", "--backing-chain", "--output=json", str(path)))
    return [Path(os.path.normpath(Path(image["filename"]).absolute())) for image in images]


def bitmaps(path: Path) -> list[BitmapInfo]:
    """The persistent dirty bitmaps stored in a qcow2 image."""
    data = info(path).get("format-specific", {}).get("data", {})
    return [
        BitmapInfo(name=b["name"], granularity=int(b["granularity"]), flags=tuple(b["flags"]))
        for b in data.get("bitmaps", [])
    ]


def add_bitmap(path: Path, name: str, enable: bool = True) -> None:
    """Add a persistent bitmap (recording when ``enable``) to a closed image."""
    _run("bitmap", "--add", "--enable" if enable else "--disable", str(path), name)


def remove_bitmap(path: Path, name: str) -> None:
    """Remove a persistent bitmap from a closed image."""
    _run("bitmap", "--remove", str(path), name)


def merge_bitmaps(path: Path, target: str, sources: list[str], *, enable: bool = False) -> None:
    """Merge the bitmaps ``sources`` of a closed image into its bitmap ``target``,
    which then records when ``enable``, in one qemu-img run."""
    args = ["bitmap"]
    for source in sources:
        args += ["--merge", source]
    args += ["--enable"] if enable else []
    _run(*args, str(path), target)


def commit(top: Path, *, keep_top: bool = True) -> None:
    """Write ``top``'s data into its backing file; ``keep_top`` keeps it intact."""
    _run("commit", "-q", *(["-d"] if keep_top else []), str(top))


def rebase_unsafe(path: Path, backing: Path | None, *, backing_fmt: str = "qcow2") -> None:
    """Point ``path`` at another backing file without copying any data.

    The caller guarantees the new backing has the same content as the old one
    where ``path`` is unallocated. ``None`` removes the backing file.
    """
    if backing is None:
        _run("rebase", "-u", "-b", "", str(path))
        return
    _run("rebase", "-u", "-b", _relative(backing, path), "-F", backing_fmt, str(path))


def map_allocated(path: Path) -> list[Extent]:
    """Extents holding data anywhere in the chain of ``path``, merged, in order."""
    entries = json.loads(_run("map", "-U", "--output=json", str(path)))
    extents: list[Extent] = []
    for entry in entries:
        if not entry.get("data"):
            continue
        if extents and extents[-1].end == entry["start"]:
            last = extents.pop()
            extents.append(Extent(last.start, last.length + entry["length"], zero=False))
        else:
            extents.append(Extent(entry["start"], entry["length"], zero=False))
    return extents


def convert(
    src: Path, dst: Path, *, src_fmt: str, dst_fmt: str, options: tuple[str, ...] = ()
) -> None:
    """Copy ``src`` (with its backing chain) into a new image ``dst`` of format
    ``dst_fmt`` (sparse); ``options`` are the format's ``-o`` options."""
    extra = ["-o", ",".join(options)] if options else []
    _run("convert", "-f", src_fmt, "-O", dst_fmt, *extra, str(src), str(dst))
