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

Both are parsed with argparse, not Typer: a copy tool is timed as a process,
and Typer (with its pydantic adapter) and Rich cost ~0.1 s of start-up.
cli/main.py runs them without importing either; Rich loads only for human
output (the progress bar, the summary). ``siterecovery --help`` lists them
through cli/app.py, which forwards to :func:`run`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from siterecovery.cli.common import JSON_HELP, VAULT_HELP, UsageError, emit
from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.values import parse_size

if TYPE_CHECKING:  # The engine (numpy...) loads only when a sync runs.
    from siterecovery.keys import SecretKey
    from siterecovery.replication.options import SyncMode
    from siterecovery.replication.sync import Progress as ProgressCallback

PROG = "siterecovery"
HELP = {
    "sync": "Make DST read the same as SRC: only allocated (full), differing (checksum)\n"
    "or dirty (tracked, with &bitmap=NAME in an NBD URL) blocks move.",
    "sync-receive": "Receive syncs from `siterecovery sync SRC ADDRESS` into DST "
    "(created if missing).",
}
"""Each command's description, its first paragraph also its line in ``siterecovery --help``."""
RECEIVE_NOTE = (
    "Without --key, whoever reaches ADDRESS can write DST: listen on loopback or a\n"
    "unix socket, or use --key (every frame is then sealed and authenticated)."
)
KEY_HELP = "Encrypt with this vault key (AES-256-GCM; the receiver needs the same key)."

Options = argparse.Namespace
Handler = Callable[[Options], None]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises :class:`UsageError` instead of exiting
    (cli/main.py prints it, as JSON with --json, and picks the exit code)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, prog=self.prog, usage=self.format_usage())


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; an option's default shown when it has a value."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        shown = action.default not in (None, False, argparse.SUPPRESS)
        if shown and action.option_strings and "%(default)" not in (action.help or ""):
            return f"{action.help} (default: %(default)s)"
        return action.help


def run(name: str, args: Sequence[str], *, before: Sequence[str] = ()) -> int:
    """Run the command ``name`` with its arguments ``args``; ``before``: the
    global options given before the command (``--vault DIR``, ``--json``).

    Returns 0 (also after ``--help``); raises UsageError or SiteRecoveryError.
    """
    handler, parser = COMMANDS[name]
    given = _global_parser().parse_args(before)
    try:
        options = parser().parse_args(args)
    except SystemExit as done:  # --help: argparse printed it
        return done.code if isinstance(done.code, int) else 0
    options.vault = options.vault or given.vault
    options.json = options.json or given.json
    handler(options)
    return 0


# -- the commands --------------------------------------------------------------


def sync(options: Options) -> None:
    """``siterecovery sync``: run the engine, print its report."""
    from siterecovery.replication.options import SyncOptions
    from siterecovery.replication.standalone import SyncRequest, run_sync

    settings = SyncOptions(
        mode=_mode(options.mode),
        threads=options.threads,
        block_size=parse_size("block_size", options.block_size),
        chunk_size=parse_size("chunk_size", options.chunk_size),
        flush=options.flush,
    )
    secret = _load_key(options.vault, options.key) if options.key else None
    request = SyncRequest(options.src, options.dst, settings, compress=options.compress,
                          key=secret, resume=options.resume, verify=options.verify)  # fmt: skip
    with _progress_bar(enabled=not options.json) as progress:
        doc = run_sync(request, progress=progress)
    emit(doc, _render_sync, as_json=options.json)


def receive(options: Options) -> None:
    """``siterecovery sync-receive``: serve until done, print the summary."""
    from siterecovery.replication.standalone import ReceiveSession

    secret = _load_key(options.vault, options.key) if options.key else None
    once = not options.forever
    with ReceiveSession(options.dst, options.listen, key=secret, once=once) as receiver:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: receiver.stop())
        sys.stderr.write(f"listening on {receiver.address}\n")
        sys.stderr.flush()
        doc = receiver.serve()
    emit(doc, _render_summary, as_json=options.json)


# -- the command lines -------------------------------------------------------


def _sync_parser() -> Parser:
    parser = _command_parser("sync", HELP["sync"])
    parser.add_argument("src", metavar="SRC", help="Source image or NBD URL.")
    parser.add_argument("dst", metavar="DST", help="Target: image, NBD URL, tcp://H:P, unix:PATH.")
    option = parser.add_argument
    option("--mode", metavar="full|checksum|tracked", default="full", help="What to send.")
    option("--threads", type=int, metavar="N", default=4, help="Workers per stage.")
    option("--block-size", metavar="B", default="64K", help="Checksum and zero block.")
    option("--chunk-size", metavar="B", default="1M", help="Largest request (a multiple of B).")
    option("--compress", action="store_true", help="zstd over the wire.")
    option("--key", metavar="NAME", help=KEY_HELP)
    option("--resume", action="store_true", help="Resume from the receiver's last checkpoint.")
    option(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Compare whole-disk digests at the end.",
    )
    option(
        "--flush",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Make the target durable (fsync).",
    )
    _add_globals(parser)
    return parser


def _receive_parser() -> Parser:
    parser = _command_parser("sync-receive", f"{HELP['sync-receive']}\n\n{RECEIVE_NOTE}")
    parser.add_argument("dst", metavar="DST", help="Target image or NBD URL.")
    option = parser.add_argument
    option(
        "--listen",
        metavar="ADDRESS",
        default="tcp://127.0.0.1:0",
        help="tcp://HOST:PORT (0: any) or unix:PATH.",
    )
    option("--key", metavar="NAME", help=KEY_HELP)
    option("--forever", action="store_true", help="Keep serving after a sync completed.")
    _add_globals(parser)
    return parser


COMMANDS: dict[str, tuple[Handler, Callable[[], Parser]]] = {
    "sync": (sync, _sync_parser),
    "sync-receive": (receive, _receive_parser),
}


def _command_parser(name: str, description: str) -> Parser:
    return Parser(
        prog=f"{PROG} {name}",
        description=description,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )


def _add_globals(parser: Parser) -> None:
    """``--vault`` and ``--json``, accepted after the command too (its value wins)."""
    parser.add_argument("--vault", type=Path, metavar="DIR", help=VAULT_HELP)
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def _global_parser() -> Parser:
    """The options cli/main.py found before the command."""
    parser = Parser(prog=PROG, add_help=False, allow_abbrev=False)
    _add_globals(parser)
    return parser


# -- helpers -------------------------------------------------------------------


def _mode(text: str) -> SyncMode:
    from siterecovery.replication.options import SyncMode

    try:
        return SyncMode(text)
    except ValueError:
        reason = f"'{text}' is not full, checksum or tracked"
        raise InvalidInput(field="mode", reason=reason) from None


def _load_key(vault: Path | None, name: str) -> SecretKey:
    """The key ``name`` from the vault database (read here: no daemon needed)."""
    from siterecovery.cli.common import resolve_vault, vault_store
    from siterecovery.keys.master import MasterKey
    from siterecovery.services.keys import load_key

    where = resolve_vault(vault)
    with vault_store(where) as store:
        return load_key(store, master=MasterKey(where), name=name)


@contextmanager
def _progress_bar(*, enabled: bool) -> Iterator[ProgressCallback | None]:
    """A Rich bar on stderr (bytes done/total, rate, ETA), or nothing."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from siterecovery.cli import render

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
    from siterecovery.cli import render

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


def _render_summary(doc: dict[str, Any]) -> None:
    from siterecovery.cli import render

    render.everything(doc)
