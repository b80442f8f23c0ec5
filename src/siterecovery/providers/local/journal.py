"""The record journal of the lab guest workload: a disk format whose consistency
can be checked from the disk images alone.

The guest workload writes random data to a VM's disks and, after each write,
a record naming it. Any image of those disks (a recovery point, a failed-over
copy) can later be checked: the records must form a gapless run, and the data of
every record still in the journal must read back exactly as it was written.

On-disk format (version 1)
--------------------------
Integers are little-endian, sizes are bytes, ``xxh3`` is XXH3-64 with seed 0.

Superblock, the first 4096 bytes of disk 0::

    offset  size  field
    0       8     magic b"SRWKLDSB"
    8       4     format version (1)
    12      4     number of disks n (1..64)
    16      8     workload seed (u64)
    24      16    workload id (random, chosen at format time; records repeat it)
    40      8     journal offset on disk 0 (4096)
    48      8     journal size (a multiple of the slot size; default 16 MiB)
    56      4     slot size (4096)
    60      4     number of slots = journal size / slot size
    64      8     data offset on disk 0 (journal offset + journal size)
    72      4     block size (4096): alignment and unit of every data write
    76      4     smallest data write (4096)
    80      4     largest data write (65536)
    84      4     reserved, zero
    88      8*n   virtual size of each disk, in disk order
    4088    8     xxh3 of bytes 0..4087
    (every other byte is zero)

Journal: the slots right after the superblock on disk 0, a ring: record ``seq``
lives in slot ``seq % nslots`` and overwrites record ``seq - nslots``. A slot is
all zeroes (empty) or holds one record::

    offset  size  field
    0       8     magic b"SRWKLDRC"
    8       8     seq (u64, from 1)
    16      4     disk index
    20      4     flags, zero
    24      8     data offset on that disk (a multiple of the block size)
    32      4     data length (a multiple of the block size, 4 KiB to 64 KiB)
    36      4     reserved, zero
    40      8     link tag  \\ a record of another VM this record depends on: that
    48      8     link seq  / workload's seed and its last acknowledged seq when
                              this record was written (both zero: no link)
    56      16    workload id (as in the superblock)
    72..4087      zero
    4088    8     xxh3 of bytes 0..4087

The checksum sits in the last sector of the slot, so a slot write torn at any
sector boundary fails it.

Data region: disk 0 from the data offset to its end, every other disk whole
(each rounded down to the block size). Record ``seq`` is fully determined by
``(seed, seq)``, so a checker can regenerate it:

- placement: ``a, b`` = the two u64 of ``blake2b(u64 seed || u64 seq,
  digest_size=16, person=b"srwl-plan")``; the length is ``4096 * (1 + a % 16)``
  (``n`` blocks); disk ``i`` offers ``p_i = blocks_i - n + 1`` start blocks in
  its data region, and ``b % sum(p_i)`` picks the disk and the start block in
  disk order (uniform over every disk's data region);
- data: the first ``length / 8`` outputs of NumPy's PCG64 bit generator seeded
  with ``SeedSequence([seed, seq])`` (``random_raw``), as little-endian u64
  (NumPy keeps bit-generator streams stable across releases, NEP 19).

Write protocol (:meth:`JournalWriter.append`): the data is written and its
disk flushed, then the record slot is written and disk 0 flushed, then the
record is acknowledged. So any point-in-time image of the block layer (what a
qemu snapshot or a copy of a quiesced guest captures), and what a disk holds
after its storage daemon was killed, holds every record up to some
``last_seq`` and at most the data (whole or part) of record ``last_seq + 1``
without its record. (The flush between the data and the record is needed: a
qcow2 daemon killed with unflushed writes may keep the record, in an allocated
cluster, and lose the data's new cluster, whose table update was still in its
cache; seen in CI as an inconsistent point after a crashed VM.)

Links: a workload that *follows* another (the lab's db01 follows web01) reads
the other's acknowledged seq before each record and stores it as the link. Two
images are consistent with each other when no record of one links to a seq the
other does not hold (:func:`dangling_links`).

Consistency (:func:`check`): the valid records form the contiguous run of seqs
``max(1, last_seq - nslots + 1) .. last_seq``, each in its slot, none torn, each
matching its placement; and walking them newest to oldest, every byte of a
record's range that no newer record overwrote reads as the record's data (or as
the data of the unacknowledged record ``last_seq + 1``, where that overlaps).
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from siterecovery.disk.base import BlockDevice
from siterecovery.domain.errors import GuestError, InvalidInput

FORMAT_VERSION = 1
SUPER_MAGIC = b"SRWKLDSB"
RECORD_MAGIC = b"SRWKLDRC"
SUPERBLOCK_SIZE = 4096
SLOT_SIZE = 4096
BLOCK_SIZE = 4096
MIN_WRITE = 4 * 1024
MAX_WRITE = 64 * 1024
MAX_DISKS = 64
DEFAULT_JOURNAL_SIZE = 16 * 1024 * 1024
"""Bytes of journal on disk 0: 4096 slots, so a check covers the last 4096 records."""

_SUPER_HEAD = struct.Struct("<8sIIQ16sQQIIQIIII")
_RECORD_HEAD = struct.Struct("<8sQIIQIIQQ16s")
_CHECKSUM = struct.Struct("<Q")
_CHECKSUM_AT = 4088
_PLAN = struct.Struct("<QQ")
_PLAN_PERSON = b"srwl-plan"
_MAX_U64 = 2**64 - 1
_MAX_ERRORS = 50

Bytes = npt.NDArray[np.uint8]


def _xxh3(buf: bytes | bytearray | memoryview) -> int:
    return int(xxhash.xxh3_64_intdigest(buf))


@dataclass(frozen=True, slots=True)
class Superblock:
    """The journal's geometry and seed, as stored at offset 0 of disk 0."""

    seed: int
    workload_id: bytes
    disk_sizes: tuple[int, ...]
    journal_size: int = DEFAULT_JOURNAL_SIZE
    journal_offset: int = SUPERBLOCK_SIZE
    slot_size: int = SLOT_SIZE
    block_size: int = BLOCK_SIZE
    min_write: int = MIN_WRITE
    max_write: int = MAX_WRITE
    version: int = FORMAT_VERSION

    @property
    def nslots(self) -> int:
        return self.journal_size // self.slot_size

    @property
    def data_offset(self) -> int:
        """Where the data region of disk 0 starts."""
        return self.journal_offset + self.journal_size

    def data_region(self, disk: int) -> tuple[int, int]:
        """``(start, end)`` of the data region of ``disk``, block aligned."""
        end = self.disk_sizes[disk] // self.block_size * self.block_size
        return (self.data_offset if disk == 0 else 0), end

    def slot_offset(self, seq: int) -> int:
        """Offset on disk 0 of the slot of record ``seq``."""
        return self.journal_offset + (seq % self.nslots) * self.slot_size

    def problems(self) -> list[str]:
        """Why this geometry cannot work (empty when it can)."""
        found = []
        if not 1 <= len(self.disk_sizes) <= MAX_DISKS:
            found.append(f"a journal spans 1 to {MAX_DISKS} disks, not {len(self.disk_sizes)}")
        if self.journal_size < self.slot_size or self.journal_size % self.slot_size:
            found.append(f"journal size {self.journal_size} is not a multiple of {self.slot_size}")
        if self.nslots >= 2**32:
            found.append(f"journal size {self.journal_size} is too large")
        if (self.slot_size, self.block_size) != (SLOT_SIZE, BLOCK_SIZE):
            found.append(f"slot and block size must be {SLOT_SIZE}")
        if not 0 <= self.seed <= _MAX_U64:
            found.append(f"seed {self.seed} is not a u64")
        found += [f"disk {i} is too small" for i in range(len(self.disk_sizes)) if self._small(i)]
        return found

    def _small(self, disk: int) -> bool:
        start, end = self.data_region(disk)
        return end - start < self.max_write

    def pack(self) -> bytes:
        """The 4096 bytes of the superblock."""
        head = _SUPER_HEAD.pack(
            SUPER_MAGIC, self.version, len(self.disk_sizes), self.seed, self.workload_id,
            self.journal_offset, self.journal_size, self.slot_size, self.nslots,
            self.data_offset, self.block_size, self.min_write, self.max_write, 0,
        )  # fmt: skip
        sizes = struct.pack(f"<{len(self.disk_sizes)}Q", *self.disk_sizes)
        return _sealed(head + sizes, SUPERBLOCK_SIZE)

    @classmethod
    def unpack(cls, buf: bytes) -> Superblock:
        """Parse a superblock; raises GuestError when it is corrupt or unsupported."""
        if len(buf) != SUPERBLOCK_SIZE or buf[:8] != SUPER_MAGIC:
            raise GuestError(detail="disk 0 holds no workload superblock")
        if not _seal_ok(buf):
            raise GuestError(detail="the workload superblock of disk 0 fails its checksum")
        fields = _SUPER_HEAD.unpack_from(buf)
        if fields[1] != FORMAT_VERSION:
            raise GuestError(detail=f"workload journal version {fields[1]} is not supported")
        ndisks = min(fields[2], MAX_DISKS)
        sizes = struct.unpack_from(f"<{ndisks}Q", buf, _SUPER_HEAD.size)
        superblock = cls(
            seed=fields[3], workload_id=fields[4], disk_sizes=sizes, journal_offset=fields[5],
            journal_size=fields[6], slot_size=fields[7], block_size=fields[10],
            min_write=fields[11], max_write=fields[12],
        )  # fmt: skip
        derived = (SUPERBLOCK_SIZE, superblock.nslots, superblock.data_offset)
        if superblock.problems() or (fields[5], fields[8], fields[9]) != derived:
            raise GuestError(detail=f"the workload superblock of disk 0 is invalid: {fields}")
        return superblock


@dataclass(frozen=True, slots=True)
class Record:
    """One journal record: ``length`` bytes at ``offset`` of disk ``disk``."""

    seq: int
    disk: int
    offset: int
    length: int
    link_tag: int = 0
    link_seq: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    def pack(self, workload_id: bytes) -> bytes:
        """The slot (4096 bytes) holding this record."""
        head = _RECORD_HEAD.pack(
            RECORD_MAGIC, self.seq, self.disk, 0, self.offset, self.length, 0,
            self.link_tag, self.link_seq, workload_id,
        )  # fmt: skip
        return _sealed(head, SLOT_SIZE)

    @classmethod
    def unpack(cls, slot: bytes | memoryview, workload_id: bytes) -> Record:
        """Parse a non-empty slot; raises ValueError saying why it is not a valid record."""
        if bytes(slot[:8]) != RECORD_MAGIC:
            raise ValueError("bad magic")
        if not _seal_ok(slot):
            raise ValueError("checksum mismatch")
        fields = _RECORD_HEAD.unpack_from(slot)
        if fields[9] != workload_id:
            raise ValueError("written by another workload")
        _, seq, disk, _, offset, length, _, link_tag, link_seq, _ = fields
        return cls(seq, disk, offset, length, link_tag, link_seq)


def _sealed(head: bytes, size: int) -> bytes:
    """``head`` zero-padded to ``size`` with the xxh3 of the rest in the last 8 bytes."""
    body = head.ljust(size - _CHECKSUM.size, b"\0")
    return body + _CHECKSUM.pack(_xxh3(body))


def _seal_ok(buf: bytes | memoryview) -> bool:
    at = len(buf) - _CHECKSUM.size
    return bool(_CHECKSUM.unpack_from(buf, at)[0] == _xxh3(buf[:at]))


def plan_record(superblock: Superblock, seq: int) -> Record:
    """Where record ``seq`` writes: deterministic from ``(seed, seq)``."""
    digest = hashlib.blake2b(
        _PLAN.pack(superblock.seed, seq), digest_size=16, person=_PLAN_PERSON
    ).digest()
    a, b = _PLAN.unpack(digest)
    block = superblock.block_size
    smallest, largest = superblock.min_write // block, superblock.max_write // block
    nblocks = smallest + a % (largest - smallest + 1)
    regions = [superblock.data_region(i) for i in range(len(superblock.disk_sizes))]
    choices = [max(0, (end - start) // block - nblocks + 1) for start, end in regions]
    pick = b % sum(choices)
    for disk, count in enumerate(choices):
        if pick < count:
            return Record(seq, disk, regions[disk][0] + pick * block, nblocks * block)
        pick -= count
    raise AssertionError("unreachable: pick < sum(choices)")


def record_data(seed: int, seq: int, length: int) -> Bytes:
    """The ``length`` bytes record ``seq`` writes (``length`` a multiple of 8)."""
    generator = np.random.PCG64(np.random.SeedSequence([seed, seq]))
    words: npt.NDArray[np.uint64] = generator.random_raw(length // 8)
    return words.astype("<u8", copy=False).view(np.uint8)


def read_superblock(device: BlockDevice) -> Superblock | None:
    """The superblock of disk 0, or None when the disk was never formatted.

    Raises GuestError when a superblock is there but corrupt or unsupported.
    """
    if device.size < SUPERBLOCK_SIZE:
        return None
    buf = bytearray(SUPERBLOCK_SIZE)
    device.readinto(0, memoryview(buf))
    if buf[:8] != SUPER_MAGIC:
        return None
    return Superblock.unpack(bytes(buf))


def format_disks(
    devices: Sequence[BlockDevice], *, seed: int, journal_size: int = DEFAULT_JOURNAL_SIZE
) -> None:
    """Write an empty journal over ``devices`` (disk 0 first), forgetting any old one.

    Only the superblock and the journal are written (the journal is zeroed,
    then the superblock written, then disk 0 flushed); data regions are left
    as they are. Raises InvalidInput when the disks are too small or too many.
    """
    superblock = Superblock(
        seed=seed,
        workload_id=uuid.uuid4().bytes,
        disk_sizes=tuple(device.size for device in devices),
        journal_size=journal_size,
    )
    if problems := superblock.problems():
        raise InvalidInput(field="disks", reason="; ".join(problems))
    devices[0].zero(superblock.journal_offset, superblock.journal_size)
    devices[0].write(0, memoryview(superblock.pack()))
    devices[0].flush()


def _check_devices(superblock: Superblock, devices: Sequence[BlockDevice]) -> None:
    """Raise GuestError unless ``devices`` are the disks the journal was formatted on."""
    if len(devices) != len(superblock.disk_sizes):
        raise GuestError(
            detail=f"the journal spans {len(superblock.disk_sizes)} disks, "
            f"{len(devices)} were given"
        )
    for index, (device, size) in enumerate(zip(devices, superblock.disk_sizes, strict=True)):
        if device.size != size:
            raise GuestError(detail=f"disk {index} is {device.size} bytes, the journal says {size}")


def open_journal(devices: Sequence[BlockDevice]) -> Superblock:
    """The superblock of formatted ``devices``; GuestError when they are not."""
    if not devices:
        raise InvalidInput(field="disks", reason="no disk given")
    superblock = read_superblock(devices[0])
    if superblock is None:
        raise GuestError(detail="disk 0 holds no workload superblock: it was never formatted")
    _check_devices(superblock, devices)
    return superblock


# A slot as read: a record, None when empty, or why it is torn or corrupt.
Slot = Record | str | None


def read_slots(device: BlockDevice, superblock: Superblock) -> list[Slot]:
    """Every slot of the journal, in slot order (reads the whole journal once)."""
    buf = bytearray(superblock.journal_size)
    device.readinto(superblock.journal_offset, memoryview(buf))
    words = np.frombuffer(buf, dtype=np.uint64).reshape(superblock.nslots, -1)
    used: list[bool] = np.asarray(words.any(axis=1), dtype=bool).tolist()
    view, size = memoryview(buf), superblock.slot_size
    return [
        _slot(view[i * size : (i + 1) * size], superblock) if used[i] else None
        for i in range(superblock.nslots)
    ]


def _slot(view: memoryview, superblock: Superblock) -> Slot:
    try:
        record = Record.unpack(view, superblock.workload_id)
    except ValueError as e:
        return str(e)
    planned = plan_record(superblock, record.seq)
    if record.seq == 0 or replace(record, link_tag=0, link_seq=0) != planned:
        return f"seq {record.seq} does not match its placement"
    return record


def last_seq(slots: Sequence[Slot]) -> int:
    """The highest seq of a valid record (0 when the journal is empty)."""
    return max((slot.seq for slot in slots if isinstance(slot, Record)), default=0)


class JournalWriter:
    """Appends records to formatted disks, one at a time. Not thread-safe."""

    def __init__(self, devices: Sequence[BlockDevice], superblock: Superblock, last: int) -> None:
        self._devices = list(devices)
        self._superblock = superblock
        self._last = last

    @classmethod
    def open(cls, devices: Sequence[BlockDevice]) -> JournalWriter:
        """Continue the journal of ``devices`` after its last valid record.

        Raises GuestError when the disks hold no journal or not this one.
        """
        superblock = open_journal(devices)
        return cls(devices, superblock, last_seq(read_slots(devices[0], superblock)))

    @property
    def superblock(self) -> Superblock:
        return self._superblock

    @property
    def last_seq(self) -> int:
        """The last record written and flushed (acknowledged)."""
        return self._last

    def probe(self) -> None:
        """Read the superblock sector back: raises DiskError when disk 0 is unreachable."""
        self._devices[0].readinto(0, memoryview(bytearray(512)))

    def append(self, link: tuple[int, int] = (0, 0)) -> Record:
        """Write the next record's data and flush it, then its slot and flush; return it.

        ``link`` is ``(tag, seq)`` of the record of another workload this one
        depends on. When this returns, the record is durable (acknowledged).
        Raises DiskError from the devices; the record is then not acknowledged.
        """
        superblock = self._superblock
        planned = plan_record(superblock, self._last + 1)
        record = replace(planned, link_tag=link[0], link_seq=link[1])
        data = record_data(superblock.seed, record.seq, record.length)
        self._devices[record.disk].write(record.offset, data.data)
        self._devices[record.disk].flush()  # the data is durable before its record
        slot = record.pack(superblock.workload_id)
        self._devices[0].write(superblock.slot_offset(record.seq), memoryview(slot))
        self._devices[0].flush()
        self._last = record.seq
        return record


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What :func:`check` found. ``errors`` name the seq they concern as ``seq N``."""

    consistent: bool
    last_seq: int
    first_seq_checked: int
    records_checked: int
    errors: list[str] = field(default_factory=list)
    seed: int = 0
    links: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per link tag (a followed workload's seed, as a string): the highest seq
    linked (``seq``) and the record that links it (``record``)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "consistent": self.consistent,
            "last_seq": self.last_seq,
            "first_seq_checked": self.first_seq_checked,
            "records_checked": self.records_checked,
            "errors": list(self.errors),
            "seed": str(self.seed),
            "links": {tag: dict(link) for tag, link in self.links.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckReport:
        return cls(
            consistent=bool(data["consistent"]),
            last_seq=int(data["last_seq"]),
            first_seq_checked=int(data["first_seq_checked"]),
            records_checked=int(data["records_checked"]),
            errors=[str(e) for e in data["errors"]],
            seed=int(data["seed"]),
            links={
                str(tag): {k: int(v) for k, v in link.items()}
                for tag, link in data["links"].items()
            },
        )


def dangling_links(reports: dict[str, CheckReport]) -> list[str]:
    """Records of one image that depend on a record another image lacks.

    ``reports`` maps a name (a VM) to its image's check. A link to a workload
    none of the reports covers is not judged.
    """
    by_seed = {str(r.seed): name for name, r in reports.items()}
    problems = []
    for name, report in reports.items():
        for tag, link in sorted(report.links.items()):
            peer = by_seed.get(tag)
            if peer is not None and link["seq"] > reports[peer].last_seq:
                problems.append(
                    f"{name} record {link['record']} depends on {peer} record {link['seq']}, "
                    f"but {peer} holds records up to {reports[peer].last_seq} only"
                )
    return problems


def check(devices: Sequence[BlockDevice]) -> CheckReport:
    """Check the journal and the data of ``devices`` (disk 0 first).

    A blank formatted set is consistent with ``last_seq`` 0; unformatted disks
    are not consistent. Only reads. Raises DiskError when a device cannot be
    read (an I/O failure is not an inconsistency).
    """
    try:
        superblock = open_journal(devices)
    except GuestError as e:
        return CheckReport(False, 0, 0, 0, [str(e)])
    return _Checker(devices, superblock).run()


def _links(run: Sequence[Record]) -> dict[str, dict[str, int]]:
    links: dict[str, dict[str, int]] = {}
    for record in run:
        tag = str(record.link_tag)
        if record.link_tag and record.link_seq > links.get(tag, {}).get("seq", -1):
            links[tag] = {"seq": record.link_seq, "record": record.seq}
    return links


class _RangeSet:
    """Disjoint, sorted, merged byte ranges of one disk."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not in the set, in order."""
        found, pos = [], start
        i = bisect_right(self._ends, start)
        while i < len(self._starts) and self._starts[i] < end:
            if self._starts[i] > pos:
                found.append((pos, self._starts[i]))
            pos = max(pos, self._ends[i])
            i += 1
        if pos < end:
            found.append((pos, end))
        return found

    def add(self, start: int, end: int) -> None:
        i = bisect_left(self._ends, start)
        j = bisect_right(self._starts, end)
        if i < j:
            start, end = min(start, self._starts[i]), max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]


class _Checker:
    """One run of :func:`check`. Reads each range once into one reused buffer."""

    def __init__(self, devices: Sequence[BlockDevice], superblock: Superblock) -> None:
        self._devices = devices
        self._sb = superblock
        self._slots = read_slots(devices[0], superblock)
        self._last = last_seq(self._slots)
        self._next = plan_record(superblock, self._last + 1)
        self._buf = bytearray(superblock.max_write)
        self._errors: list[str] = []

    def run(self) -> CheckReport:
        for index, slot in enumerate(self._slots):
            self._check_slot(index, slot)
        run = self._newest_run()
        claimed = [_RangeSet() for _ in self._devices]
        for record in run:
            self._check_data(record, claimed[record.disk].gaps(record.offset, record.end))
            claimed[record.disk].add(record.offset, record.end)
        first = run[-1].seq if run else 0
        return CheckReport(
            not self._errors, self._last, first, len(run), self._report(),
            seed=self._sb.seed, links=_links(run),
        )  # fmt: skip

    def _report(self) -> list[str]:
        if len(self._errors) <= _MAX_ERRORS:
            return self._errors
        return [*self._errors[:_MAX_ERRORS], f"... and {len(self._errors) - _MAX_ERRORS} more"]

    def _expected(self, index: int) -> int:
        """The seq slot ``index`` must hold (0: it must be empty)."""
        nslots = self._sb.nslots
        return self._last - (self._last - index) % nslots

    def _check_slot(self, index: int, slot: Slot) -> None:
        expected = max(self._expected(index), 0)
        seq = f"seq {expected}: " if expected else ""
        if isinstance(slot, str):
            self._errors.append(f"{seq}slot {index} holds a torn or corrupt record ({slot})")
        elif slot is None and expected:
            self._errors.append(f"{seq}record missing (slot {index} is empty)")
        elif isinstance(slot, Record) and slot.seq != expected:
            self._errors.append(f"{seq}record missing (slot {index} holds seq {slot.seq})")

    def _newest_run(self) -> list[Record]:
        """The valid records from ``last_seq`` down to the first gap (newest first)."""
        run: list[Record] = []
        for seq in range(self._last, max(0, self._last - self._sb.nslots), -1):
            slot = self._slots[seq % self._sb.nslots]
            if not isinstance(slot, Record) or slot.seq != seq:
                break
            run.append(slot)
        return run

    def _check_data(self, record: Record, gaps: list[tuple[int, int]]) -> None:
        if not gaps:
            return  # Fast path: newer records overwrote all of it.
        data = record_data(self._sb.seed, record.seq, record.length)
        bad = sum(self._count_bad(record, data, start, end) for start, end in gaps)
        if bad:
            self._errors.append(
                f"seq {record.seq}: {bad} bytes of its data differ "
                f"(disk {record.disk}, {record.offset}+{record.length})"
            )

    def _count_bad(self, record: Record, data: Bytes, start: int, end: int) -> int:
        """Bytes of ``[start, end)`` that hold neither the record's data nor the next's."""
        view = memoryview(self._buf)[: end - start]
        self._devices[record.disk].readinto(start, view)
        actual = np.frombuffer(view, dtype=np.uint8)
        bad = actual != data[start - record.offset : end - record.offset]
        if not bad.any():
            return 0  # Fast path.
        nxt = self._next
        low, high = max(start, nxt.offset), min(end, nxt.end)
        if nxt.disk == record.disk and low < high:
            theirs = record_data(self._sb.seed, nxt.seq, nxt.length)
            mine = slice(low - start, high - start)
            bad[mine] &= actual[mine] != theirs[low - nxt.offset : high - nxt.offset]
        return int(bad.sum())
