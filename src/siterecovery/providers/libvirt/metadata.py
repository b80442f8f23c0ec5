"""Keeping libvirt's checkpoint metadata in agreement with the qcow2 bitmaps.

A checkpoint ``NAME`` of ours is a persistent dirty bitmap ``sr-NAME`` in each
image of a VM *and* a libvirt checkpoint ``sr-NAME`` whose disks use that
bitmap. The bitmaps are the truth; libvirt's metadata is derived from them.

While the domain is stopped the bitmaps change offline: ``qemu-img bitmap``
(create, add_checkpoint, replace_disks) and a qemu-storage-daemon's Tracker in
a stopped disk access, which calls the same bitmap checkpoint ``NAME``. So
before every start, and after each such change, :func:`redefine_checkpoints`
drops our libvirt checkpoints (metadata only: the bitmaps stay) and redefines
them (``VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE``) from the bitmaps the images
hold, keeping the creation time libvirt knew; that also heals a libvirtd that
lost its metadata. While the domain runs, libvirt (``LibvirtDiskAccess``)
changes bitmaps and metadata together.

The two disagree on one thing: libvirt's bitmaps all keep recording (each holds
every write since its checkpoint began), while a qemu-storage-daemon's freeze
stops the other bitmaps when it starts a new one. :func:`as_libvirt_bitmaps`
turns the second kind into the first before libvirt sees them.

Everything here runs on a stopped domain whose images nothing holds open (the
caller holds the VM's lock and stopped any transient daemon).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt  # type: ignore[import-untyped, import-not-found, unused-ignore]

from siterecovery.disk import qemu_img
from siterecovery.disk.checkpoints import BITMAP_PREFIX
from siterecovery.providers.libvirt.connection import Domain, translated

log = logging.getLogger(__name__)


def redefine_checkpoints(domain: Domain, images: dict[str, Path]) -> None:
    """Make libvirt's checkpoints of a stopped domain those its ``images`` (guest
    device -> qcow2) hold: ours dropped and redefined from the ``sr-`` bitmaps,
    each a child of the one before, on the disks that carry it (the others
    ``checkpoint='no'``), made recording first (:func:`as_libvirt_bitmaps`).

    The order is libvirt's creation times where it knew the checkpoint, then
    (checkpoints made offline since) the images' order, after the known ones."""
    known = _checkpoint_times(domain)
    present = {target: path for target, path in images.items() if path.exists()}
    for path in present.values():
        as_libvirt_bitmaps(path, known)
    on_disk = _bitmaps_by_name(present)
    order = sorted(on_disk, key=lambda name: known.get(name, math.inf))  # Stable.
    _drop_checkpoint_metadata(domain)
    newest = max([int(time.time()), *known.values()])
    inactive = ET.fromstring(domain.xml(inactive=True))
    parent = None
    for index, name in enumerate(order):
        created = known.get(name, newest + index + 1)
        xml = redefine_xml(name, on_disk[name], list(images), created, parent, inactive)
        with translated(domain.uri, f"redefine checkpoint '{name}' of '{domain.name}'"):
            domain.raw.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        parent = name


def as_libvirt_bitmaps(path: Path, known: dict[str, int]) -> None:
    """Give a closed image's bitmaps libvirt's meaning: each records every write
    since its checkpoint began.

    A stopped bitmap holds the changes up to the next one's start: merging into
    it every bitmap that may be younger and making it record again gives it (at
    least) the writes since its own start. "May be younger": all but those
    libvirt knew as older (``known`` creation times), since the images' order
    of bitmaps is no creation order to rely on; one too many only marks more
    blocks, never fewer. When one of those is in use (its qemu died), that
    union is unknown: the stopped bitmap is removed (its checkpoint is lost,
    the next pass falls back to a checksum sync)."""
    ours = [b for b in qemu_img.bitmaps(path) if b.name.startswith(BITMAP_PREFIX)]
    for bitmap in ours:
        if bitmap.enabled or bitmap.in_use:
            continue
        born = known.get(bitmap.name)
        younger = [
            b for b in ours
            if b is not bitmap and not (born is not None and known.get(b.name, born) < born)
        ]  # fmt: skip
        if any(b.in_use for b in younger):
            log.warning("bitmap %s of %s removed: a younger one is in use", bitmap.name, path)
            qemu_img.remove_bitmap(path, bitmap.name)
            continue
        qemu_img.merge_bitmaps(path, bitmap.name, [b.name for b in younger], enable=True)


def redefine_xml(
    name: str,
    targets: list[str],
    every_target: list[str],
    created: int,
    parent: str | None,
    domain: ET.Element,
) -> str:
    """The XML redefining checkpoint ``name`` over the disks ``targets`` (their
    bitmap of the same name), the other disks untracked, with the domain's
    inactive definition."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "creationTime").text = str(created)
    if parent is not None:
        ET.SubElement(ET.SubElement(root, "parent"), "name").text = parent
    disks = ET.SubElement(root, "disks")
    for target in every_target:
        tracked = {"checkpoint": "bitmap", "bitmap": name}
        attributes = tracked if target in targets else {"checkpoint": "no"}
        ET.SubElement(disks, "disk", {"name": target, **attributes})
    root.append(domain)
    return ET.tostring(root, encoding="unicode")


def bitmap_flags(images: dict[str, Path]) -> dict[str, list[str]]:
    """``NAME:flags`` of each image's bitmaps (for the log); unreadable ones left out."""
    flags = {}
    for target, path in images.items():
        with contextlib.suppress(Exception):
            flags[target] = [f"{b.name}:{','.join(b.flags)}" for b in qemu_img.bitmaps(path)]
    return flags


def _bitmaps_by_name(images: dict[str, Path]) -> dict[str, list[str]]:
    """Our bitmaps' names (``sr-...``), in the images' order -> targets carrying them."""
    found: dict[str, list[str]] = {}
    for target, path in images.items():
        for bitmap in qemu_img.bitmaps(path):
            if bitmap.name.startswith(BITMAP_PREFIX):
                found.setdefault(bitmap.name, []).append(target)
    return found


def _checkpoint_times(domain: Domain) -> dict[str, int]:
    """Creation times (s) of the checkpoints of ours libvirt knows."""
    times: dict[str, int] = {}
    with translated(domain.uri, f"list checkpoints of '{domain.name}'"):
        for checkpoint in domain.raw.listAllCheckpoints(0):
            name = str(checkpoint.getName())
            if name.startswith(BITMAP_PREFIX):
                created = ET.fromstring(checkpoint.getXMLDesc(0)).findtext("creationTime")
                times[name] = int(created or 0)
    return times


def _drop_checkpoint_metadata(domain: Domain) -> None:
    """Delete our checkpoints' metadata, newest first (the bitmaps stay)."""
    with translated(domain.uri, f"drop checkpoint metadata of '{domain.name}'"):
        found = domain.raw.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
        for checkpoint in reversed(found):
            if str(checkpoint.getName()).startswith(BITMAP_PREFIX):
                checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
