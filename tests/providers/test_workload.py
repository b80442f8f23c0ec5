"""The guest workload and its record journal.

The checker tests build journals in-process on raw files (fast, exact); the
process tests run the real workload against a real qemu-storage-daemon over
NBD, stop it with SIGTERM and check what is on the disks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from siterecovery.disk import qemu_img
from siterecovery.disk.base import BlockDevice
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.disk.nbd import NbdDevice
from siterecovery.disk.qsd import DiskSpec, StorageDaemon
from siterecovery.domain.errors import GuestError, InvalidInput
from siterecovery.providers.local import guest, journal
from siterecovery.providers.local.journal import JournalWriter, check, format_disks

MiB = 1024 * 1024
DISK_SIZE = 32 * MiB
SMALL_JOURNAL = 256 * 1024  # 64 slots: the ring wraps after 64 records.
VM_JOURNAL = 1 * MiB  # 256 slots.
EXPORTS = ("d0", "d1")
FAST = 200.0


# Helpers ---------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate``; fail the test (not a timing assertion) if it never holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def digest(devices: Sequence[BlockDevice]) -> str:
    """sha256 over every byte of every device, in order."""
    h = hashlib.sha256()
    buf = bytearray(MiB)
    for device in devices:
        for offset in range(0, device.size, MiB):
            view = memoryview(buf)[: min(MiB, device.size - offset)]
            device.readinto(offset, view)
            h.update(view)
    return h.hexdigest()


def copy_to_raw(devices: Sequence[BlockDevice], directory: Path) -> list[FileDevice]:
    """Copy every device, whole, to a raw file; open the copies writable."""
    copies = []
    buf = bytearray(MiB)
    for index, device in enumerate(devices):
        path = directory / f"copy{index}.raw"
        create_raw(path, device.size)
        copy = FileDevice.open(path, writable=True)
        for offset in range(0, device.size, MiB):
            view = memoryview(buf)[: min(MiB, device.size - offset)]
            device.readinto(offset, view)
            copy.write(offset, view)
        copies.append(copy)
    return copies


def flip_byte(device: BlockDevice, offset: int) -> None:
    buf = bytearray(1)
    device.readinto(offset, memoryview(buf))
    buf[0] ^= 0xFF
    device.write(offset, memoryview(buf))


def write_data_of(devices: Sequence[BlockDevice], seq: int, *, upto: int | None = None) -> None:
    """Write (the first ``upto`` bytes of) record ``seq``'s data, without its record."""
    superblock = journal.read_superblock(devices[0])
    assert superblock is not None
    record = journal.plan_record(superblock, seq)
    data = journal.record_data(superblock.seed, seq, record.length)[:upto]
    devices[record.disk].write(record.offset, data.data)


def write_record_of(devices: Sequence[BlockDevice], seq: int) -> None:
    """Write record ``seq``'s slot, without its data."""
    superblock = journal.read_superblock(devices[0])
    assert superblock is not None
    record = journal.plan_record(superblock, seq)
    slot = record.pack(superblock.workload_id)
    devices[0].write(superblock.slot_offset(seq), memoryview(slot))


# Fixtures --------------------------------------------------------------------


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short private directory under /tmp (unix socket paths fit)."""
    path = Path(tempfile.mkdtemp(prefix="srw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def raw_disks(workdir: Path) -> Iterator[list[BlockDevice]]:
    """Two writable 32 MiB raw files."""
    devices: list[BlockDevice] = []
    for name in ("a.raw", "b.raw"):
        create_raw(workdir / name, DISK_SIZE)
        devices.append(FileDevice.open(workdir / name, writable=True))
    yield devices
    for device in devices:
        device.close()


@pytest.fixture
def writer(raw_disks: list[BlockDevice]) -> JournalWriter:
    format_disks(raw_disks, seed=1234, journal_size=SMALL_JOURNAL)
    return JournalWriter.open(raw_disks)


@dataclass
class Vm:
    """Two qcow2 disks served by a qemu-storage-daemon, and its workload files."""

    directory: Path
    daemon: StorageDaemon
    pids: list[int] = field(default_factory=list)

    @property
    def control(self) -> Path:
        return self.directory / "control.sock"

    @property
    def state(self) -> Path:
        return self.directory / "state.json"

    @property
    def log(self) -> Path:
        return self.directory / "workload.log"

    def spawn(self, rate: float = FAST, **options: Any) -> int:
        options.setdefault("format_if_blank", True)
        pid = guest.spawn(
            nbd_socket=self.daemon.nbd_socket, exports=EXPORTS, control=self.control,
            state=self.state, log=self.log, rate=rate, journal_size=VM_JOURNAL, **options,
        )  # fmt: skip
        self.pids.append(pid)
        return pid

    def client(self) -> guest.WorkloadControl:
        return guest.WorkloadControl(self.control, timeout=10.0)

    def open(self) -> list[BlockDevice]:
        return [NbdDevice.connect(self.daemon.nbd_socket, name) for name in EXPORTS]

    def check(self) -> journal.CheckReport:
        devices = self.open()
        try:
            return check(devices)
        finally:
            for device in devices:
                device.close()

    def wait_seq(self, above: int) -> int:
        client = self.client()
        wait_until(lambda: int(client.status()["seq"]) > above, f"seq > {above}")
        return int(client.status()["seq"])


@pytest.fixture
def vm(workdir: Path) -> Iterator[Vm]:
    disks = []
    for name in EXPORTS:
        qemu_img.create(workdir / f"{name}.qcow2", DISK_SIZE)
        disks.append(DiskSpec(name, workdir / f"{name}.qcow2"))
    daemon = StorageDaemon.start(workdir / "run", disks, detached=False)
    machine = Vm(workdir, daemon)
    yield machine
    for pid in machine.pids:
        guest.stop(pid, timeout=5)
    daemon.stop(timeout=5)


# The checker -----------------------------------------------------------------


def test_blank_formatted_disks_are_consistent(raw_disks: list[BlockDevice]) -> None:
    format_disks(raw_disks, seed=7)

    report = check(raw_disks)

    assert report == journal.CheckReport(True, 0, 0, 0, [], seed=7)
    assert report.to_dict() == {
        "consistent": True,
        "last_seq": 0,
        "first_seq_checked": 0,
        "records_checked": 0,
        "errors": [],
        "seed": "7",
        "links": {},
    }


def test_unformatted_disks_are_not_consistent(raw_disks: list[BlockDevice]) -> None:
    report = check(raw_disks)

    assert not report.consistent
    assert "never formatted" in report.errors[0]


def test_a_corrupt_superblock_or_wrong_disks_are_not_consistent(
    raw_disks: list[BlockDevice],
) -> None:
    format_disks(raw_disks, seed=7)

    assert "spans 2 disks" in check(raw_disks[:1]).errors[0]
    flip_byte(raw_disks[0], 16)  # The seed.
    assert "checksum" in check(raw_disks).errors[0]


def test_format_refuses_disks_too_small_for_the_journal(raw_disks: list[BlockDevice]) -> None:
    with pytest.raises(InvalidInput, match="disk 0 is too small"):
        format_disks(raw_disks, seed=7, journal_size=DISK_SIZE)


def test_records_check_consistent_across_the_ring(
    writer: JournalWriter, raw_disks: list[BlockDevice]
) -> None:
    for _ in range(200):
        writer.append()

    report = check(raw_disks)

    assert report.consistent, report.errors
    assert (report.last_seq, report.first_seq_checked, report.records_checked) == (200, 137, 64)


def test_records_spread_over_every_disk(writer: JournalWriter) -> None:
    records = [writer.append() for _ in range(64)]

    assert {record.disk for record in records} == {0, 1}
    assert all(r.offset % 4096 == 0 and 4096 <= r.length <= 65536 for r in records)
    assert min(r.offset for r in records if r.disk == 0) >= writer.superblock.data_offset


def test_a_changed_data_byte_names_its_record(
    writer: JournalWriter, raw_disks: list[BlockDevice]
) -> None:
    for _ in range(40):
        newest = writer.append()
    devices = raw_disks

    flip_byte(devices[newest.disk], newest.offset + newest.length // 2)
    report = check(devices)

    assert not report.consistent
    assert [e for e in report.errors if e.startswith(f"seq {newest.seq}: 1 bytes")] != []


def test_a_torn_record_is_not_consistent(
    writer: JournalWriter, raw_disks: list[BlockDevice]
) -> None:
    for _ in range(100):
        writer.append()
    devices = raw_disks
    slot = writer.superblock.slot_offset(90)

    devices[0].write(slot + 3584, memoryview(bytes(512)))  # The last sector is old.
    report = check(devices)

    assert not report.consistent
    assert any(e.startswith("seq 90:") and "torn" in e for e in report.errors), report.errors


def test_a_gap_in_the_journal_is_not_consistent(
    writer: JournalWriter, raw_disks: list[BlockDevice]
) -> None:
    for _ in range(100):
        writer.append()
    devices = raw_disks

    devices[0].write(writer.superblock.slot_offset(80), memoryview(bytes(4096)))
    report = check(devices)

    assert not report.consistent
    assert any(e.startswith("seq 80: record missing") for e in report.errors), report.errors
    assert report.first_seq_checked == 81  # Data is checked down to the gap.


def test_an_earlier_image_is_consistent_at_its_own_point(
    writer: JournalWriter, raw_disks: list[BlockDevice], workdir: Path
) -> None:
    for _ in range(50):
        writer.append()
    point = copy_to_raw(raw_disks, workdir)
    for _ in range(50):
        writer.append()

    assert (check(point).consistent, check(point).last_seq) == (True, 50)
    assert check(raw_disks).last_seq == 100
    assert check(raw_disks).consistent


def test_the_unacknowledged_next_record_may_be_on_disk(
    writer: JournalWriter, raw_disks: list[BlockDevice], workdir: Path
) -> None:
    for _ in range(60):
        writer.append()
    whole = copy_to_raw(raw_disks, workdir)
    (workdir / "part").mkdir()
    part = copy_to_raw(raw_disks, workdir / "part")

    write_data_of(whole, 61)  # Crashed after the data write of record 61...
    write_data_of(part, 61, upto=4096 + 100)  # ... or during it.

    assert (check(whole).consistent, check(whole).last_seq) == (True, 60)
    assert (check(part).consistent, check(part).last_seq) == (True, 60)


def test_a_record_whose_data_is_missing_is_not_consistent(
    writer: JournalWriter, raw_disks: list[BlockDevice], workdir: Path
) -> None:
    for _ in range(60):
        writer.append()
    image = copy_to_raw(raw_disks, workdir)

    write_record_of(image, 61)
    report = check(image)

    assert (report.consistent, report.last_seq) == (False, 61)
    assert any(e.startswith("seq 61:") for e in report.errors), report.errors


def test_data_of_a_later_record_without_its_record_is_not_consistent(
    writer: JournalWriter, raw_disks: list[BlockDevice], workdir: Path
) -> None:
    """A copy mixing two instants: record 62's data landed, record 61 did not."""
    for _ in range(60):
        writer.append()
    image = copy_to_raw(raw_disks, workdir)
    superblock = writer.superblock
    records = [journal.plan_record(superblock, seq) for seq in range(1, 61)]
    later = next(
        s for s in range(62, 500) if _overlaps(journal.plan_record(superblock, s), records)
    )

    write_data_of(image, later)

    assert not check(image).consistent


def _overlaps(record: journal.Record, others: list[journal.Record]) -> bool:
    return any(
        o.disk == record.disk and o.offset < record.end and record.offset < o.end
        for o in others[-64:]
    )


def test_the_writer_continues_after_the_last_record(
    writer: JournalWriter, raw_disks: list[BlockDevice]
) -> None:
    for _ in range(70):
        writer.append()

    again = JournalWriter.open(raw_disks)

    assert again.last_seq == 70
    assert again.append().seq == 71
    assert check(raw_disks).consistent


def test_the_writer_refuses_unformatted_disks(raw_disks: list[BlockDevice]) -> None:
    with pytest.raises(GuestError, match="never formatted"):
        JournalWriter.open(raw_disks)


# The process -----------------------------------------------------------------


def test_run_then_sigterm_leaves_a_consistent_journal(vm: Vm) -> None:
    pid = vm.spawn(rate=FAST, seed=99)
    vm.wait_seq(above=300)  # The 256-slot ring has wrapped.

    assert guest.stop(pid) == 0
    state = guest.read_state(vm.state)
    report = vm.check()

    assert report.consistent, report.errors
    assert report.last_seq == state["seq"] > 300
    assert report.records_checked == 256
    assert (state["running"], state["seed"]) == (False, 99)
    assert state["records"] == state["seq"]
    assert "stopped at seq" in vm.log.read_text()


def test_quiesce_freezes_the_disks_until_thaw(vm: Vm, workdir: Path) -> None:
    vm.spawn()
    client = vm.client()
    vm.wait_seq(above=20)

    seq = client.quiesce(timeout=30)
    status = client.status()
    devices = vm.open()
    before = digest(devices)
    time.sleep(0.5)
    after = digest(devices)
    point = copy_to_raw(devices, workdir)
    client.thaw()

    assert (status["paused"], status["depth"], status["seq"]) == (True, 1, seq)
    assert before == after
    assert client.status()["seq"] >= seq
    assert (check(point).consistent, check(point).last_seq) == (True, seq)
    assert vm.wait_seq(above=seq) > seq
    assert client.status()["paused"] is False


def test_quiesces_nest(vm: Vm) -> None:
    vm.spawn()
    client = vm.client()
    vm.wait_seq(above=5)

    first = client.quiesce()
    second = client.quiesce()
    client.thaw()
    devices = vm.open()
    before = digest(devices)
    time.sleep(0.3)

    assert first == second
    assert client.status()["depth"] == 1
    assert digest(devices) == before
    client.thaw()
    assert vm.wait_seq(above=first) > first


def test_a_forgotten_quiesce_thaws_by_itself(vm: Vm) -> None:
    vm.spawn()
    client = vm.client()
    vm.wait_seq(above=5)

    seq = client.quiesce(timeout=0.3)

    assert vm.wait_seq(above=seq) > seq
    assert client.status()["depth"] == 0
    client.thaw()  # One too many: a no-op.
    assert client.status()["depth"] == 0


def test_a_restarted_workload_continues_the_journal(vm: Vm) -> None:
    first = vm.spawn(seed=5)
    vm.wait_seq(above=30)
    guest.stop(first)
    last = guest.read_state(vm.state)["seq"]

    vm.spawn(seed=6)  # --format again: a no-op, the seed stays 5.
    status = vm.client().status()
    grown = vm.wait_seq(above=last)

    assert status["seed"] == 5
    assert status["seq"] - status["records"] == last
    assert grown > last
    assert "--seed 6 ignored" in vm.log.read_text()
    guest.stop(vm.pids[-1])
    assert vm.check().consistent


def test_an_idle_workload_writes_nothing(vm: Vm) -> None:
    vm.spawn(rate=0)
    devices = vm.open()
    before = digest(devices)
    time.sleep(0.3)

    assert vm.client().status()["seq"] == 0
    assert digest(devices) == before
    report = check(devices)
    assert (report.consistent, report.last_seq, report.records_checked) == (True, 0, 0)
    assert report.errors == [] and report.links == {}


def test_the_workload_exits_when_the_nbd_server_goes_away(vm: Vm) -> None:
    pid = vm.spawn(rate=50)
    vm.wait_seq(above=3)

    vm.daemon.kill()

    assert guest.wait(pid, timeout=20) == 1
    assert "NBD server" in vm.log.read_text()
    assert guest.read_state(vm.state)["running"] is False


def test_unformatted_disks_without_format_do_not_start(vm: Vm) -> None:
    with pytest.raises(GuestError, match="never formatted"):
        vm.spawn(format_if_blank=False)


def test_a_second_workload_on_the_same_control_socket_is_refused(vm: Vm) -> None:
    vm.spawn(rate=0)

    with pytest.raises(GuestError, match="another guest workload answers"):
        vm.spawn(rate=0)
    assert vm.client().status()["pid"] == vm.pids[0]


def test_bad_control_requests_get_an_error_reply(vm: Vm) -> None:
    vm.spawn(rate=0)

    replies = []
    with socket.socket(socket.AF_UNIX) as sock, sock.makefile("rb") as reader:
        sock.connect(str(vm.control))
        for line in (b"not json\n", b'{"op": "reboot"}\n', b'{"op": "quiesce", "timeout": -1}\n'):
            sock.sendall(line)
            replies.append(json.loads(reader.readline()))

    assert [reply["ok"] for reply in replies] == [False, False, False]
    assert "unknown request" in replies[1]["error"]
    assert vm.client().status()["paused"] is False


def test_a_silent_control_socket_raises_guest_error(workdir: Path) -> None:
    with pytest.raises(GuestError, match="does not answer"):
        guest.WorkloadControl(workdir / "nobody.sock").status()
