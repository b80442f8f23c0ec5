"""``siterecovery agent init|token|serve``: the site agent, on a machine of its site.

::

    siterecovery agent init  --dir DIR --site NAME     make DIR the agent directory of NAME
    siterecovery agent token --dir DIR [--ttl 1h]      print a one-time join token
    siterecovery agent serve --dir DIR [--listen 127.0.0.1:8471]

``init`` is idempotent (and refuses a directory of another site); ``token``
prints the token alone on stdout (``--json``: ``{token, site, fingerprint,
expires}``), for the engine's join; ``serve`` runs the agent's HTTPS API
(agent/server.py) with the operations of ``siterecovery.agent.operations:
registry(DIR)`` until SIGTERM/Ctrl-C. Nothing is written outside DIR.

Parsed with argparse, like cli/sync_cmd.py: the agent never loads the engine,
Typer or Rich. cli/main.py runs :func:`run`; ``siterecovery --help`` lists
the command through :func:`typer_entry`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from siterecovery.cli.common import JSON_HELP, emit
from siterecovery.cli.sync_cmd import HelpFormatter, Parser
from siterecovery.domain.errors import InvalidInput
from siterecovery.domain.values import parse_duration

if TYPE_CHECKING:
    from siterecovery.agent.registry import Operation

NAME = "agent"
PROG = f"siterecovery {NAME}"
HELP = "Run the site agent: the data plane of one site, on a machine of that site."
DEFAULT_LISTEN = "127.0.0.1:8471"
MAX_TTL = 7 * 86400.0
OPERATIONS_MODULE = "siterecovery.agent.operations"


def run(args: Sequence[str], *, before: Sequence[str] = ()) -> int:
    """Run ``siterecovery agent ARGS``; ``before``: the global options given
    before ``agent`` (``--json``; ``--vault`` is accepted and ignored).

    Returns 0 (also after ``--help``); raises UsageError or SiteRecoveryError.
    """
    given = _global_parser().parse_args(before)
    try:
        options = _parser().parse_args(args)
    except SystemExit as done:  # --help: argparse printed it
        return done.code if isinstance(done.code, int) else 0
    options.json = options.json or given.json
    os.umask(0o077)  # whatever the agent creates is private
    options.handler(options)
    return 0


def typer_entry() -> None:
    """Run the site agent: init, token, serve (`siterecovery agent --help`)."""
    run(["--help"])


# -- the commands --------------------------------------------------------------


def init(options: argparse.Namespace) -> None:
    from siterecovery.agent import state

    agent = state.init(options.dir, options.site)
    doc = {"dir": str(agent.dir), "site": agent.site, "fingerprint": agent.fingerprint,
           "created": agent.created, "version": agent.version}  # fmt: skip
    emit(doc, _say_init, as_json=options.json)


def token(options: argparse.Namespace) -> None:
    from siterecovery.agent import state

    ttl = parse_duration("ttl", options.ttl, minimum=1.0, maximum=MAX_TTL)
    agent = state.load(options.dir)
    text = state.new_token(agent.dir, ttl)
    doc = {"token": text, "site": agent.site, "fingerprint": agent.fingerprint,
           "expires": time.time() + ttl}  # fmt: skip
    emit(doc, _say_token, as_json=options.json)


def serve(options: argparse.Namespace) -> None:
    from siterecovery.agent import server, state

    host, port = _listen(options.listen)
    agent = state.load(options.dir)
    server.serve(agent.dir, host, port, _operations(agent.dir, host))


def _operations(directory: Path, wire_host: str) -> Mapping[str, Operation]:
    """``siterecovery.agent.operations:registry(directory)``, or none without that module."""
    try:
        module = importlib.import_module(OPERATIONS_MODULE)
    except ModuleNotFoundError as missing:
        if missing.name != OPERATIONS_MODULE:
            raise
        return {}
    operations: Mapping[str, Operation] = module.registry(directory, wire_host=wire_host)
    return operations


def _listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0: any free one)."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidInput(field="listen", reason=f"'{text}' is not HOST:PORT")
    return host, int(port)


def _say_init(doc: dict[str, Any]) -> None:
    print(f"agent directory {doc['dir']} of site '{doc['site']}'")
    print(f"certificate {doc['fingerprint']}")
    print(f"next: `{PROG} token --dir {doc['dir']}`, then `{PROG} serve --dir {doc['dir']}`")


def _say_token(doc: dict[str, Any]) -> None:
    print(doc["token"])
    until = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(doc["expires"]))
    print(f"one-time join token of site '{doc['site']}', valid until {until}",
          file=sys.stderr)  # fmt: skip


# -- the command line ----------------------------------------------------------


def _parser() -> Parser:
    parser = Parser(prog=PROG, description=HELP, formatter_class=HelpFormatter,
                    allow_abbrev=False)  # fmt: skip
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True,
                                    parser_class=Parser)  # fmt: skip
    for name, handler, description in (
        ("init", init, "Make DIR the agent directory of a site (idempotent)."),
        ("token", token, "Print a one-time join token for the engine."),
        ("serve", serve, "Serve the agent's HTTPS API until SIGTERM or Ctrl-C."),
    ):
        sub = actions.add_parser(name, help=description, description=description,
                                 formatter_class=HelpFormatter, allow_abbrev=False)  # fmt: skip
        sub.set_defaults(handler=handler)
        sub.add_argument("--dir", type=Path, required=True, metavar="DIR",
                         help="The agent directory.")  # fmt: skip
        _OPTIONS[name](sub)
        sub.add_argument("--json", action="store_true", help=JSON_HELP)
    return parser


def _init_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--site", required=True, metavar="NAME", help="The agent's site.")


def _token_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ttl", default="1h", metavar="DURATION",
                        help="How long the token stays usable (30m, 1h, 1d).")  # fmt: skip


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                        help="Address to serve on (port 0: any free port).")  # fmt: skip


_OPTIONS = {"init": _init_options, "token": _token_options, "serve": _serve_options}


def _global_parser() -> Parser:
    parser = Parser(prog="siterecovery", add_help=False, allow_abbrev=False)
    parser.add_argument("--vault", type=Path)
    parser.add_argument("--json", action="store_true")
    return parser
