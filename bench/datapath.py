"""The data-plane benchmark: ``make bench`` (``python -m bench.datapath``).

Generates its own images in a scratch directory (a 4 GiB sparse disk with
about 50% random data in scattered extents; copies with 1% and 10% of the
64 KiB blocks changed; 1 GiB and 16 GiB disks with 64 MiB of tracked
change), runs every case several times interleaved with the real tools it is
compared with, in this one run, and prints medians and ratios:

* full sync vs ``cp --sparse=always`` (raw → raw), ``qemu-img convert``
  (qcow2 → qcow2) and ``nbdcopy`` (between two qemu-storage-daemon exports);
* checksum delta (1% and 10% changed) vs ``rsync --inplace --no-whole-file``,
  with the bytes each sent next to the bytes that changed;
* tracked delta: the same change on a 1 GiB and a 16 GiB disk;
* the engine over loopback TCP (``sync-receive``) vs in-process.

Every one of our runs is the ``siterecovery sync`` command, timed as a
process (its interpreter start included), with ``--no-verify`` (the tools
do not verify either) and ``--no-flush`` (they do not fsync either; one pair
of rows shows both sides made durable). Correctness is checked apart, once
per case, with ``qemu-img compare`` or the command's own digests.

    python -m bench.datapath [--quick] [--runs N] [--dir DIR] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import images
from bench.runner import SR, Contender, Qsd, ReceiverProcess, remove, rsync_stats, run_group

GiB = 1 << 30
MiB = 1 << 20
TOOLS = ("cp", "qemu-img", "qemu-storage-daemon", "nbdcopy", "rsync")


@dataclass(frozen=True)
class Config:
    size: int
    tracked_sizes: tuple[int, int]
    tracked_change: int
    runs: int
    workdir: Path
    threads: int


@dataclass(frozen=True)
class Row:
    """One comparison: ``ours`` vs ``other`` (medians, seconds) and its target."""

    case: str
    ours: str
    ours_s: float
    other: str
    other_s: float
    measure: str
    value: float
    target: str
    ok: bool
    note: str = ""
    ours_runs: tuple[float, ...] = ()
    other_runs: tuple[float, ...] = ()


def main(argv: list[str] | None = None) -> int:
    config = _config(argv)
    _check_tools()
    rows: list[Row] = []
    started = time.monotonic()
    try:
        only = _args(argv).only
        data = _make_images(config) if only != "tracked" else None
        for name, case in CASES.items():
            if only in (None, name):
                rows += case(config, data)
    finally:
        if not _args(argv).keep:
            shutil.rmtree(config.workdir, ignore_errors=True)
    print(_markdown(rows, config, time.monotonic() - started))
    if _args(argv).json:
        Path(_args(argv).json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0  # Missed targets show in the table; a wrong result raised before.


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.datapath", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="Small images: a smoke test.")
    parser.add_argument("--runs", type=int, help="Runs per case (default 5, quick 2).")
    parser.add_argument("--dir", type=Path, help="Scratch directory (default: a new one in /tmp).")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch directory.")
    parser.add_argument("--threads", type=int, default=4, help="--threads of our runs.")
    parser.add_argument("--json", metavar="FILE", help="Also write the rows as JSON.")
    parser.add_argument("--only", choices=["full", "checksum", "tcp", "tracked"], help="One case.")
    return parser.parse_args(argv)


def _config(argv: list[str] | None) -> Config:
    args = _args(argv)
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="sr-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.quick:
        sizes = (64 * MiB, 256 * MiB)
        config = Config(256 * MiB, sizes, 4 * MiB, args.runs or 2, workdir, args.threads)
    else:
        config = Config(4 * GiB, (GiB, 16 * GiB), 64 * MiB, args.runs or 5, workdir, args.threads)
    _check_space(config)
    return config


def _check_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (run `make install`)")


def _check_space(config: Config) -> None:
    """Sparse images, but their data is real: about 7x the 4 GiB disk's data plus the
    tracked disks' (data and qcow2 copy)."""
    need = int(config.size * 0.5 * 7 + sum(config.tracked_sizes) * 0.5 * 2 + GiB)
    free = shutil.disk_usage(config.workdir).free
    if free < need:
        sys.exit(f"{config.workdir}: {free >> 30} GiB free, {need >> 30} GiB needed (try --quick)")


@dataclass(frozen=True)
class Data:
    base: Path
    base_qcow2: Path
    changed: dict[str, tuple[Path, int]]
    """label → (image, blocks changed)."""


def _make_images(config: Config) -> Data:
    say(f"images in {config.workdir}")
    base = config.workdir / "base.raw"
    images.scattered(base, config.size, seed=1)
    qcow2 = config.workdir / "base.qcow2"
    images.to_qcow2(base, qcow2)
    changed = {}
    for label, fraction, seed in (("1%", 0.01, 2), ("10%", 0.10, 3)):
        path = config.workdir / f"changed-{fraction:.2f}.raw"
        changed[label] = (path, images.changed_copy(base, path, fraction=fraction, seed=seed))
    images.warm(base, qcow2, *(path for path, _ in changed.values()))
    return Data(base, qcow2, changed)


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def ours(*args: str | Path, flush: bool = False, threads: int = 4) -> list[str]:
    """Our command as the benchmark runs it."""
    extra = ["--no-flush"] if not flush else []
    return [
        *SR,
        "sync",
        *map(str, args),
        "--json",
        "--no-verify",
        "--threads",
        str(threads),
        *extra,
    ]


def check_once(check: Callable[[], bool], what: str) -> Callable[[], None]:
    """A ``finish`` hook that checks the result after the first run only."""
    done: list[bool] = []

    def finish() -> None:
        if not done:
            done.append(True)
            if not check():
                raise RuntimeError(f"wrong result: {what}")

    return finish


# Full sync.


def full_sync(config: Config, data: Data | None) -> list[Row]:
    assert data is not None
    return _full_raw(config, data) + _full_qcow2(config, data) + _full_nbd(config, data)


def _full_raw(config: Config, data: Data) -> list[Row]:
    """Two groups: in the page cache, and durable (fsync). Apart, because deleting a
    file whose blocks reached the disk slows the next run down (ext4 ``discard``),
    so every contender of a group must follow one of the same kind."""
    say("full sync, raw → raw")
    target, n = config.workdir / "target.raw", config.threads
    fresh = lambda: remove(target)  # noqa: E731
    same = check_once(lambda: images.same_content(data.base, target), "full raw")
    cp = ["cp", "--sparse=always", str(data.base), str(target)]
    cached = [
        Contender("sync", lambda: ours(data.base, target, threads=n), fresh, same),
        Contender("cp --sparse=always", _argv(cp), fresh),
    ]
    durable = [
        Contender("sync (fsync)", lambda: ours(data.base, target, flush=True, threads=n), fresh),
        Contender("cp + sync FILE", _argv(["sh", "-c", f"{' '.join(cp)} && sync {target}"]), fresh),
    ]
    run_group(cached, config.runs)
    run_group(durable, config.runs)
    remove(target)
    return [
        _ratio_row("full, raw → raw (page cache)", *cached, 1.2),
        _ratio_row("full, raw → raw (durable: fsync)", *durable, 1.2),
    ]


def _full_qcow2(config: Config, data: Data) -> list[Row]:
    say("full sync, qcow2 → qcow2")
    target = config.workdir / "target.qcow2"
    fresh = lambda: remove(target)  # noqa: E731
    same = check_once(lambda: images.same_content(data.base_qcow2, target), "full qcow2")
    convert = [
        "qemu-img",
        "convert",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        str(data.base_qcow2),
        str(target),
    ]
    group = [
        Contender(
            "sync", lambda: ours(data.base_qcow2, target, threads=config.threads), fresh, same
        ),
        Contender("qemu-img convert", lambda: convert, fresh),
    ]
    run_group(group, config.runs)
    remove(target)
    return [_ratio_row("full, qcow2 → qcow2", group[0], group[1], 1.2)]


def _full_nbd(config: Config, data: Data) -> list[Row]:
    say("full sync, NBD → NBD (two qemu-storage-daemons)")
    target = config.workdir / "target-nbd.qcow2"
    source = Qsd([("src", data.base_qcow2, False)])
    served: list[Qsd] = []

    def fresh() -> None:
        for qsd in served:
            qsd.stop()
        served.clear()
        remove(target)
        from siterecovery.disk import qemu_img

        qemu_img.create(target, config.size)
        served.append(Qsd([("dst", target, True)]))

    def same() -> bool:
        served[0].stop()
        served.clear()
        return images.same_content(data.base_qcow2, target)

    dst = lambda: served[0].url("dst")  # noqa: E731
    group = [
        Contender(
            "sync",
            lambda: ours(source.url("src"), dst(), threads=config.threads),
            fresh,
            check_once(same, "full nbd"),
        ),
        Contender("nbdcopy", lambda: ["nbdcopy", source.url("src"), dst()], fresh),
    ]
    try:
        run_group(group, config.runs)
    finally:
        for qsd in [source, *served]:
            qsd.stop()
        remove(target)
    return [_ratio_row("full, NBD → NBD", group[0], group[1], 1.2)]


def _ratio_row(case: str, ours: Contender, tool: Contender, limit: float) -> Row:
    """Wall-clock ratio of the commands; the note gives the engine's own time and ratio."""
    ratio = ours.median / tool.median
    engine = _median([doc["seconds"] for doc in ours.docs])
    note = f"engine alone {engine:.2f} s = {engine / tool.median:.2f}x {tool.label}"
    return Row(
        case, ours.label, ours.median, tool.label, tool.median, "time ours/tool", ratio,
        f"≤ {limit}", ratio <= limit, note, _runs(ours), _runs(tool),
    )  # fmt: skip


def _runs(contender: Contender) -> tuple[float, ...]:
    return tuple(round(seconds, 3) for seconds in contender.seconds)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# Checksum delta.


def checksum_delta(config: Config, data: Data | None) -> list[Row]:
    assert data is not None
    rows = []
    for label, (changed, blocks) in data.changed.items():
        say(f"checksum delta, {label} changed, vs rsync")
        group = _delta_group(config, data.base, changed, label)
        run_group(group, config.runs)
        rows += _delta_rows(config, label, group, blocks)
    remove(config.workdir / "target.raw")
    return rows


def _delta_group(config: Config, base: Path, changed: Path, label: str) -> list[Contender]:
    target = config.workdir / "target.raw"

    def stale() -> None:
        images.copy_sparse(base, target)

    same = check_once(lambda: images.same_content(changed, target), f"checksum {label}")
    mode = ("--mode", "checksum")
    rsync = ["rsync", "--inplace", "--no-whole-file", "--stats", str(changed), str(target)]
    return [
        Contender(
            "sync --mode checksum",
            _argv(ours(changed, target, *mode, threads=config.threads)),
            stale,
            same,
        ),
        Contender("rsync --inplace --no-whole-file", _argv(rsync), stale),
    ]


def _argv(argv: list[str]) -> Callable[[], list[str]]:
    return lambda: argv


def _delta_rows(config: Config, label: str, group: list[Contender], blocks: int) -> list[Row]:
    ours, rsync = group
    speedup = rsync.median / ours.median
    changed = blocks * images.BLOCK
    digests = config.size // images.BLOCK * 16
    sent = ours.docs[-1]["bytes_sent"]
    theirs = rsync_stats(rsync.outputs[-1])
    note = (
        f"changed {changed / MiB:.1f} MiB + digests {digests / MiB:.2f} MiB; rsync literal "
        f"{theirs.get('Literal data', 0) / MiB:.1f} MiB"
    )
    bytes_ratio = sent / (changed + digests)
    return [
        Row(
            f"checksum delta, {label} changed",
            ours.label,
            ours.median,
            rsync.label,
            rsync.median,
            "speed-up vs rsync",
            speedup,
            "≥ 2",
            speedup >= 2,
            "",
            _runs(ours),
            _runs(rsync),
        ),
        Row(
            f"checksum delta, {label}: bytes sent",
            ours.label,
            sent / MiB,
            "changed + digests",
            (changed + digests) / MiB,
            "sent / (changed + digests)",
            bytes_ratio,
            "≤ 1.05",
            bytes_ratio <= 1.05,
            note + " (bytes columns in MiB)",
        ),
    ]


# Loopback TCP vs in-process.


def loopback_tcp(config: Config, data: Data | None) -> list[Row]:
    assert data is not None
    rows = []
    changed, _ = data.changed["1%"]
    cases = (
        ("full", data.base, lambda t: remove(t), ()),
        (
            "checksum 1%",
            changed,
            lambda t: images.copy_sparse(data.base, t),
            ("--mode", "checksum"),
        ),
    )
    for name, source, prepare, mode in cases:
        say(f"{name}: loopback TCP vs in-process")
        rows.append(_tcp_row(config, name, source, prepare, mode))
    return rows


def _tcp_row(
    config: Config,
    name: str,
    source: Path,
    prepare: Callable[[Path], None],
    mode: tuple[str, ...],
) -> Row:
    target = config.workdir / "target.raw"
    receiver: list[ReceiverProcess] = []

    def start() -> None:
        prepare(target)
        receiver[:] = [ReceiverProcess(target)]

    receiver_cpu: list[float] = []

    def finish() -> None:
        receiver[0].wait()
        receiver_cpu.append(receiver[0].cpu)

    same = check_once(lambda: images.same_content(source, target), f"tcp {name}")
    group = [
        Contender(
            "in-process",
            lambda: ours(source, target, *mode, threads=config.threads),
            lambda: prepare(target),
        ),
        Contender(
            "loopback TCP",
            lambda: ours(source, receiver[0].address, *mode, threads=config.threads),
            start,
            lambda: (finish(), same()),
        ),
    ]
    run_group(group, config.runs)
    remove(target)
    tcp, local = group[1], group[0]
    ratio = tcp.median / local.median
    wire = tcp.docs[-1]["wire"]
    sent, received = wire["bytes_sent"] / MiB, wire["bytes_received"] / MiB
    note = f"wire: sent {sent:.1f} MiB, received {received:.2f} MiB; " + _cpu_note(
        local, tcp, receiver_cpu
    )
    return Row(
        f"{name}: TCP vs in-process",
        tcp.label,
        tcp.median,
        local.label,
        local.median,
        "time TCP/in-process",
        ratio,
        "≤ 1.15",
        ratio <= 1.15,
        note,
        _runs(tcp),
        _runs(local),
    )


def _cpu_note(local: Contender, tcp: Contender, receiver_cpu: list[float]) -> str:
    """CPU seconds of both sides, and the shortest time they allow on this machine."""
    sender, received = tcp.median_cpu, _median(receiver_cpu)
    vcpus = len(os.sched_getaffinity(0))
    return (
        f"CPU s (medians; a command's start included, the receiver's not): in-process "
        f"{local.median_cpu:.2f}, TCP sender {sender:.2f} + receiver {received:.2f} = "
        f"{sender + received:.2f}, at least {(sender + received) / vcpus:.2f} s on {vcpus} vCPUs"
    )


# Tracked delta.


def tracked_delta(config: Config, data: Data | None) -> list[Row]:
    timings = [_tracked(config, size) for size in config.tracked_sizes]
    (small, small_s), (big, big_s) = timings
    ratio = big_s.median / small_s.median
    label = lambda size: f"{size / GiB:g} GiB" if size >= GiB else f"{size // MiB} MiB"  # noqa: E731
    change = f"{config.tracked_change // MiB} MiB"
    return [
        Row(
            f"tracked delta, {change} changed",
            f"{label(big)} disk",
            big_s.median,
            f"{label(small)} disk",
            small_s.median,
            "time big/small",
            ratio,
            "≤ 1.5",
            ratio <= 1.5,
            f"bytes read {big_s.docs[-1]['bytes_read'] / MiB:.0f} MiB",
            _runs(big_s),
            _runs(small_s),
        )
    ]


def _tracked(config: Config, size: int) -> tuple[int, Contender]:
    say(f"tracked delta on a {size >> 20} MiB disk")
    base = config.workdir / f"tracked-{size >> 20}.raw"
    image = config.workdir / f"tracked-{size >> 20}.qcow2"
    images.scattered(base, size, seed=7)
    images.to_qcow2(base, image)
    from siterecovery.disk import qemu_img

    qemu_img.add_bitmap(image, "cp1")
    with _served(image) as qsd:
        _change(qsd, size, config.tracked_change)
        url = qsd.url("src-bm", "cp1")
        verify = [*SR, "sync", url, str(base), "--mode", "tracked", "--json"]
        run_group([Contender("verify", lambda: verify)], 1)  # Untimed: digests compared.
        images.warm(base, image)
        contender = Contender(
            "tracked", lambda: ours(url, base, "--mode", "tracked", threads=config.threads)
        )
        run_group([contender], config.runs)
    remove(base, image)
    return size, contender


@contextmanager
def _served(image: Path) -> Iterator[Qsd]:
    qsd = Qsd([("src", image, True)], bitmap="cp1")
    try:
        yield qsd
    finally:
        qsd.stop()


def _change(qsd: Qsd, size: int, change: int) -> None:
    """Write ``change`` bytes of new data in random 64 KiB blocks, through the export."""
    import numpy as np

    from siterecovery.disk.nbd import NbdDevice

    rng = np.random.default_rng(11)
    blocks = rng.choice(size // images.BLOCK, size=change // images.BLOCK, replace=False)
    with NbdDevice.connect(qsd.daemon.nbd_socket, "src", writable=True) as dev:
        for index in np.sort(blocks):
            dev.write(int(index) * images.BLOCK, memoryview(rng.bytes(images.BLOCK)))
        dev.flush()


CASES: dict[str, Callable[[Config, Data | None], list[Row]]] = {
    "full": full_sync,
    "checksum": checksum_delta,
    "tcp": loopback_tcp,
    "tracked": tracked_delta,
}


# Report.


def _markdown(rows: list[Row], config: Config, seconds: float) -> str:
    head = (
        "| case | ours | s | compared with | s | measure | value | target | met |\n"
        "|---|---|---:|---|---:|---|---:|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.case} | {r.ours} | {r.ours_s:.2f} | {r.other} | {r.other_s:.2f} | "
            f"{r.measure} | {r.value:.2f} | {r.target} | {'yes' if r.ok else '**no**'} |"
        )
    notes = [f"- {r.case}: {r.note}" for r in rows if r.note]
    size = f"{config.size / GiB:g} GiB" if config.size >= GiB else f"{config.size // MiB} MiB"
    return "\n".join(
        [
            f"Medians of {config.runs} interleaved runs; {size} disk; --threads {config.threads}; "
            f"bench took {seconds:.0f} s.",
            "",
            *lines,
            "",
            *notes,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
