"""Full copies between local images offloaded to ``qemu-img convert``
(replication/offload.py), checked with ``qemu-img compare`` and ``qemu-img map``."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.domain.errors import DiskError, SyncCancelled
from siterecovery.replication.offload import copy_image
from siterecovery.replication.options import SyncMode, SyncOptions
from siterecovery.replication.standalone import SyncRequest, run_sync

KiB, MiB = 1024, 1024 * 1024
SIZE = 64 * MiB


def scattered_qcow2(tmp_path: Path, name: str, seed: int) -> Path:
    """A qcow2 image of SIZE with 24 random extents of data, holes elsewhere."""
    raw, image = tmp_path / f"{name}.raw", tmp_path / f"{name}.qcow2"
    create_raw(raw, SIZE)
    rng = random.Random(seed)
    with FileDevice.open(raw, writable=True) as dev:
        for _ in range(24):
            length = rng.randrange(64 * KiB, 2 * MiB, 64 * KiB)
            dev.write(rng.randrange(0, SIZE - length, 64 * KiB), memoryview(rng.randbytes(length)))
    qemu_img.convert(raw, image, src_fmt="raw", dst_fmt="qcow2")
    raw.unlink()
    return image


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


def allocated(image: Path) -> int:
    return sum(extent.length for extent in qemu_img.map_allocated(image))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_new_target_is_created_with_the_source_data_only(tmp_path: Path) -> None:
    src = scattered_qcow2(tmp_path, "src", seed=1)
    dst = tmp_path / "dst.qcow2"
    seen: list[tuple[int, int]] = []
    result = copy_image(
        (src, "qcow2"), (dst, "qcow2"), create=True, progress=lambda *p: seen.append(p)
    )
    assert same_content(src, dst) and qemu_img.info(dst)["format"] == "qcow2"
    data = allocated(src)
    assert result.mode is SyncMode.FULL
    assert result.bytes_read == result.bytes_written == data < SIZE // 2
    assert allocated(dst) == data  # holes stay holes
    assert seen[-1] == (data, data) and {total for _, total in seen} == {data}
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_an_existing_target_is_overwritten_in_place(tmp_path: Path) -> None:
    """``-n``: the stale target's data where the source has holes reads as zeroes after."""
    src = scattered_qcow2(tmp_path, "src", seed=2)
    dst = scattered_qcow2(tmp_path, "dst", seed=3)
    assert not same_content(src, dst)
    copy_image((src, "qcow2"), (dst, "qcow2"), create=False)
    assert same_content(src, dst)


def test_a_smaller_target_is_refused_and_left_alone(tmp_path: Path) -> None:
    src = scattered_qcow2(tmp_path, "src", seed=4)
    dst = tmp_path / "small.qcow2"
    qemu_img.create(dst, SIZE // 2)
    before = file_digest(dst)
    request = SyncRequest(str(src), str(dst), SyncOptions(mode=SyncMode.FULL))
    with pytest.raises(DiskError, match="smaller than the source"):
        run_sync(request)
    assert file_digest(dst) == before


def test_a_cancelled_copy_stops_qemu_img(tmp_path: Path) -> None:
    src = scattered_qcow2(tmp_path, "src", seed=5)
    dst = tmp_path / "dst.qcow2"
    with pytest.raises(SyncCancelled) as raised:
        copy_image((src, "qcow2"), (dst, "qcow2"), create=True, cancelled=lambda: True)
    assert raised.value.fields["resume_offset"] == 0
    running = subprocess.run(["pgrep", "-f", f"qemu-img convert.*{dst}"], capture_output=True)
    assert running.returncode == 1  # no converter left behind


def test_a_failing_conversion_is_a_disk_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + bytes(1020))  # a qcow2 magic and nothing valid after it
    with pytest.raises(DiskError, match="qemu-img"):
        copy_image((broken, "qcow2"), (tmp_path / "dst.qcow2", "qcow2"), create=True)
