"""The qemu-img wrappers, on real images."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.base import Extent
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.domain.errors import DiskError

from .support import KiB, MiB, digest, write

SIZE = 16 * MiB


def qemu_io_write(image: Path, byte: int, offset: int, length: int) -> None:
    command = f"write -P {byte} {offset} {length}"
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True,
                   capture_output=True)  # fmt: skip


def raw_digest(image: Path, fmt: str, workdir: Path, length: int = SIZE) -> str:
    """Digest of the first ``length`` guest-visible bytes (through a raw copy)."""
    raw = workdir / f"{image.name}.raw"
    raw.unlink(missing_ok=True)
    qemu_img.convert(image, raw, src_fmt=fmt, dst_fmt="raw")
    with FileDevice.open(raw) as device:
        return digest(device, 0, length)


def test_create_and_info(workdir: Path) -> None:
    qemu_img.create(workdir / "a.qcow2", SIZE)
    info = qemu_img.info(workdir / "a.qcow2")
    assert (info["format"], info["virtual-size"]) == ("qcow2", SIZE)
    assert qemu_img.virtual_size(workdir / "a.qcow2") == SIZE


def test_backing_is_stored_relative_so_the_chain_can_move(workdir: Path) -> None:
    chain = workdir / "chain"
    (chain / "points").mkdir(parents=True)
    qemu_img.create(chain / "base.qcow2", SIZE)
    qemu_img.create(chain / "points" / "p1.qcow2", backing=chain / "base.qcow2")
    assert qemu_img.info(chain / "points" / "p1.qcow2")["backing-filename"] == "../base.qcow2"
    assert qemu_img.virtual_size(chain / "points" / "p1.qcow2") == SIZE
    moved = chain.rename(workdir / "moved")
    assert qemu_img.backing_chain(moved / "points" / "p1.qcow2") == [
        moved / "points" / "p1.qcow2",
        moved / "base.qcow2",
    ]


def test_bitmaps_add_list_remove(workdir: Path) -> None:
    image = workdir / "a.qcow2"
    qemu_img.create(image, SIZE)
    qemu_img.add_bitmap(image, "on")
    qemu_img.add_bitmap(image, "off", enable=False)
    found = {b.name: b for b in qemu_img.bitmaps(image)}
    assert (found["on"].enabled, found["off"].enabled) == (True, False)
    assert not found["on"].in_use
    assert found["on"].granularity == 64 * KiB
    with pytest.raises(DiskError, match="already exists"):
        qemu_img.add_bitmap(image, "on")
    qemu_img.remove_bitmap(image, "on")
    assert [b.name for b in qemu_img.bitmaps(image)] == ["off"]


def test_map_allocated_lists_the_data_of_the_whole_chain(workdir: Path) -> None:
    raw = workdir / "a.raw"
    create_raw(raw, SIZE)
    with FileDevice.open(raw, writable=True) as device:
        write(device, MiB, 1, 64 * KiB)
        write(device, 5 * MiB, 2, 128 * KiB)
    qemu_img.convert(raw, workdir / "base.qcow2", src_fmt="raw", dst_fmt="qcow2")
    qemu_img.create(workdir / "top.qcow2", backing=workdir / "base.qcow2")
    qemu_io_write(workdir / "top.qcow2", 3, 5 * MiB + 128 * KiB, 64 * KiB)
    assert qemu_img.map_allocated(workdir / "top.qcow2") == [
        Extent(MiB, 64 * KiB, zero=False),
        Extent(5 * MiB, 192 * KiB, zero=False),
    ]


def test_commit_keeping_the_top(workdir: Path) -> None:
    qemu_img.create(workdir / "base.qcow2", SIZE)
    qemu_io_write(workdir / "base.qcow2", 1, 0, MiB)
    qemu_img.create(workdir / "top.qcow2", backing=workdir / "base.qcow2")
    qemu_io_write(workdir / "top.qcow2", 2, MiB, MiB)
    top_before = raw_digest(workdir / "top.qcow2", "qcow2", workdir)
    qemu_img.commit(workdir / "top.qcow2", keep_top=True)
    assert raw_digest(workdir / "base.qcow2", "qcow2", workdir) == top_before
    assert raw_digest(workdir / "top.qcow2", "qcow2", workdir) == top_before


def test_rebase_unsafe_points_at_another_backing(workdir: Path) -> None:
    qemu_img.create(workdir / "base.qcow2", SIZE)
    qemu_img.convert(workdir / "base.qcow2", workdir / "copy.qcow2",
                     src_fmt="qcow2", dst_fmt="qcow2")  # fmt: skip
    qemu_img.create(workdir / "top.qcow2", backing=workdir / "base.qcow2")
    qemu_img.rebase_unsafe(workdir / "top.qcow2", workdir / "copy.qcow2")
    assert qemu_img.backing_chain(workdir / "top.qcow2")[1] == workdir / "copy.qcow2"
    assert qemu_img.info(workdir / "top.qcow2")["backing-filename"] == "copy.qcow2"
    qemu_img.rebase_unsafe(workdir / "top.qcow2", None)
    assert qemu_img.backing_chain(workdir / "top.qcow2") == [workdir / "top.qcow2"]


@pytest.mark.parametrize("fmt", ["qcow2", "vpc", "vhdx", "vmdk"])
def test_convert_round_trip_keeps_the_content(workdir: Path, fmt: str) -> None:
    raw = workdir / "a.raw"
    create_raw(raw, SIZE)
    with FileDevice.open(raw, writable=True) as device:
        write(device, 3 * MiB, 9, MiB)
        original = digest(device)
    qemu_img.convert(raw, workdir / f"a.{fmt}", src_fmt="raw", dst_fmt=fmt)
    # VHD (vpc) rounds the size up to its disk geometry: compare our bytes only.
    assert qemu_img.virtual_size(workdir / f"a.{fmt}") >= SIZE
    assert raw_digest(workdir / f"a.{fmt}", fmt, workdir) == original


def test_errors_carry_qemu_img_stderr(workdir: Path) -> None:
    with pytest.raises(DiskError, match="No such file or directory"):
        qemu_img.info(workdir / "missing.qcow2")
    with pytest.raises(DiskError, match="qemu-img create failed"):
        qemu_img.create(workdir / "bad.qcow2", -1)
