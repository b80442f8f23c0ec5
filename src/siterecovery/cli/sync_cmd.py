"""``siterecovery sync SRC DST`` and ``siterecovery sync-receive DST``: the data plane alone.

No daemon: the engine runs in this process (``--key`` reads the key from the
vault directory). SRC and DST are image paths (raw, or qcow2 and other qemu
formats through a private qemu-storage-daemon), ``nbd+unix:///EXPORT?socket=PATH``
URLs, and, for DST only, a receiver: ``tcp://HOST:PORT`` or ``unix:PATH``.

``sync --json`` prints one document: ``mode``, ``bytes_read``, ``bytes_sent``
(bytes put on the wire, headers included; for a local target, bytes written),
``bytes_written``, ``bytes_zeroed``, ``bytes_hashed``, ``blocks_changed``,
``seconds`` (the sync, without the final digests), ``resumed_from``,
``digests`` (``source`` and ``target``, equal; null with ``--no-verify``) and
``wire`` (traffic counters, null for a local target).

``sync-receive`` prints ``listening on ADDRESS`` on stderr as soon as it
listens (``--listen tcp://127.0.0.1:0`` picks a free port), serves until
one sync completed (or, with ``--forever``, until SIGTERM/Ctrl-C), then
prints its summary.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from siterecovery.cli import render
from siterecovery.cli.session import JsonOpt, Session, VaultOpt, vault_store
from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.values import parse_size

if TYPE_CHECKING:  # The engine (numpy...) loads only when a sync runs.
    from siterecovery.keys import SecretKey
    from siterecovery.replication.sync import Progress as ProgressCallback
    from siterecovery.replication.sync import SyncMode

KeyOpt = Annotated[
    str | None,
    typer.Option(
        "--key",
        metavar="NAME",
        help="Encrypt with this vault key (AES-256-GCM; the receiver needs the same key).",
    ),
]


def sync(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(metavar="SRC", help="Source image or NBD URL.")],
    dst: Annotated[
        str, typer.Argument(metavar="DST", help="Target: image, NBD URL, tcp://H:P, unix:PATH.")
    ],
    mode: Annotated[
        str, typer.Option("--mode", metavar="full|checksum|tracked", help="What to send.")
    ] = "full",
    threads: Annotated[int, typer.Option("--threads", help="Workers per stage.")] = 4,
    block_size: Annotated[
        str, typer.Option("--block-size", metavar="B", help="Checksum and zero block.")
    ] = "64K",
    chunk_size: Annotated[
        str, typer.Option("--chunk-size", metavar="B", help="Largest request (a multiple of B).")
    ] = "1M",
    compress: Annotated[bool, typer.Option("--compress", help="zstd over the wire.")] = False,
    key: KeyOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Resume from the receiver's last checkpoint.")
    ] = False,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Compare whole-disk digests at the end.")
    ] = True,
    flush: Annotated[
        bool, typer.Option("--flush/--no-flush", help="Make the target durable (fsync).")
    ] = True,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Make DST read the same as SRC: only allocated (full), differing (checksum)
    or dirty (tracked, with &bitmap=NAME in an NBD URL) blocks move."""
    from siterecovery.replication.standalone import SyncRequest, run_sync
    from siterecovery.replication.sync import SyncOptions

    session = Session.of(ctx, vault, json_out)
    options = SyncOptions(
        mode=_mode(mode),
        threads=threads,
        block_size=parse_size("block_size", block_size),
        chunk_size=parse_size("chunk_size", chunk_size),
        flush=flush,
    )
    secret = _load_key(session.vault, key) if key else None
    request = SyncRequest(src, dst, options, compress=compress, key=secret, resume=resume,
                          verify=verify)  # fmt: skip
    with _progress_bar(enabled=not session.json) as progress:
        doc = run_sync(request, progress=progress)
    session.emit(doc, _render_sync)


def receive(
    ctx: typer.Context,
    dst: Annotated[str, typer.Argument(metavar="DST", help="Target image or NBD URL.")],
    listen: Annotated[
        str,
        typer.Option("--listen", metavar="ADDRESS", help="tcp://HOST:PORT (0: any) or unix:PATH."),
    ] = "tcp://127.0.0.1:0",
    key: KeyOpt = None,
    forever: Annotated[
        bool, typer.Option("--forever", help="Keep serving after a sync completed.")
    ] = False,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Receive syncs from `siterecovery sync SRC ADDRESS` into DST (created if missing).

    Without --key, whoever reaches ADDRESS can write DST: listen on loopback or a
    unix socket, or use --key (every frame is then sealed and authenticated).
    """
    from siterecovery.replication.standalone import ReceiveSession

    session = Session.of(ctx, vault, json_out)
    secret = _load_key(session.vault, key) if key else None
    with ReceiveSession(dst, listen, key=secret, once=not forever) as receiver:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: receiver.stop())
        sys.stderr.write(f"listening on {receiver.address}\n")
        sys.stderr.flush()
        doc = receiver.serve()
    session.emit(doc, render.everything)


def _mode(text: str) -> SyncMode:
    from siterecovery.replication.sync import SyncMode

    try:
        return SyncMode(text)
    except ValueError:
        reason = f"'{text}' is not full, checksum or tracked"
        raise InvalidInput(field="mode", reason=reason) from None


def _load_key(vault: Path, name: str) -> SecretKey:
    """The key ``name`` from the vault database (read here: no daemon needed)."""
    from siterecovery.services.keys import load_key

    with vault_store(vault) as store:
        return load_key(store, name=name)


@contextmanager
def _progress_bar(*, enabled: bool) -> Iterator[ProgressCallback | None]:
    """A Rich bar on stderr (bytes done/total, rate, ETA), or nothing."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("sync"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=render.console(stderr=True),
        transient=True,
    )
    task = bar.add_task("sync", total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


def _render_sync(doc: dict[str, Any]) -> None:
    seconds = doc["seconds"]
    rate = doc["bytes_read"] / seconds if seconds > 0 else 0.0
    render.say(
        f"{doc['mode']} sync: read {render.human_bytes(doc['bytes_read'])}, "
        f"sent {render.human_bytes(doc['bytes_sent'])}, "
        f"{doc['blocks_changed']} blocks changed, "
        f"{seconds:.2f} s ({render.human_bytes(rate)}/s)"
    )
    if doc["digests"]:
        render.say(f"digests equal: {doc['digests']['target']}", style="green")
