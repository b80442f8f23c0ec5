"""The ``siterecovery`` command: a thin client of the daemon's REST API.

Parse -> request -> render. Every command takes ``--vault DIR`` and ``--json``
(before or after the subcommand). With ``--json`` a command prints exactly one
JSON document on stdout, errors included (``{"error": {"code", "message",
"details"}}``). Exit codes follow the error's category::

    0  ok                 3  refused by a rule
    1  anything else      4  not found
    2  usage (bad option or value)

Only this module knows exit codes. The Typer application (cli/app.py) is
imported only for the commands that need it: ``sync`` and ``sync-receive``
(cli/sync_cmd.py) parse their options with argparse and start without Typer,
its pydantic adapter or Rich (start-up counts for a copy tool).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from siterecovery.cli import agent_cmd, sync_cmd
from siterecovery.cli.common import EXIT_CODES, UsageError, print_json
from siterecovery.domain.errors import Category, InternalError, SiteRecoveryError, category_of

PROG = "siterecovery"

COMMANDS: dict[str, tuple[str, str, bool]] = {
    # name: (module under siterecovery.cli, attribute, is a sub-app)
    "init": ("local_cmd", "init", False),
    "serve": ("local_cmd", "serve", False),
    "lab": ("inventory_cmd", "lab_app", True),
    "site": ("inventory_cmd", "site_app", True),
    "host": ("inventory_cmd", "host_app", True),
    "vm": ("inventory_cmd", "vm_app", True),
    "protect": ("protection_cmd", "protect", False),
    "replicate": ("protection_cmd", "replicate", False),
    "items": ("protection_cmd", "list_items", False),
    "item": ("protection_cmd", "item_app", True),
    "disable": ("protection_cmd", "disable", False),
    "points": ("protection_cmd", "list_points", False),
    "point": ("protection_cmd", "point_app", True),
    "failover": ("failover_cmd", "failover", False),
    "complete": ("failover_cmd", "complete", False),
    "commit": ("failover_cmd", "commit", False),
    "reprotect": ("failover_cmd", "reprotect", False),
    "cleanup-test": ("failover_cmd", "cleanup_test", False),
    "verify": ("failover_cmd", "verify", False),
    "demo": ("demo_cmd", "demo", False),
    "jobs": ("jobs_cmd", "list_jobs", False),
    "job": ("jobs_cmd", "app", True),
    "sync": ("sync_cmd", "sync", False),  # argparse commands: see sync_cmd.COMMANDS
    "sync-receive": ("sync_cmd", "receive", False),
    "agent": ("agent_cmd", "typer_entry", False),  # argparse: cli/agent_cmd.py
    "key": ("keys_cmd", "app", True),
    "group": ("recovery_cmd", "group_app", True),
    "plan": ("recovery_cmd", "plan_app", True),
}
"""Every command, in help order. Only the command being run is imported (with
its module's dependencies): ``siterecovery sync`` never loads the HTTP client,
Typer or Rich (start-up time counts for a copy tool; see docs/PERFORMANCE.md)."""


def command_index(args: Sequence[str]) -> int | None:
    """Where in ``args`` the command is, when it is one of ours (skipping global options)."""
    rest = iter(enumerate(args))
    for index, arg in rest:
        if arg == "--vault":
            next(rest, None)
        elif not arg.startswith("-"):
            return index if arg in COMMANDS else None
    return None


def exit_code(code: str) -> int:
    """The exit code of an error code (by its category)."""
    return EXIT_CODES.get(category_of(code), 1)


def wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` is among the options (before a ``--`` separator)."""
    options = list(argv)[: list(argv).index("--")] if "--" in argv else argv
    return "--json" in options


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = wants_json(args)
    try:
        return dispatch(args, as_json=as_json)
    except SiteRecoveryError as error:
        return fail(error.to_dict(), as_json=as_json)
    except UsageError as error:
        return usage_error(error, as_json=as_json)
    except Exception as error:
        if not as_json:
            raise
        return fail(
            InternalError(detail=f"{type(error).__name__}: {error}").to_dict(), as_json=True
        )


def dispatch(args: list[str], *, as_json: bool) -> int:
    """Run a data-plane command without Typer (unless ``--help`` comes before
    it: the root's help), any other through the Typer app of that command."""
    index = command_index(args)
    names = None if index is None else args[index : index + 1]
    if index is not None and args[index] in sync_cmd.COMMANDS and "--help" not in args[:index]:
        return sync_cmd.run(args[index], args[index + 1 :], before=args[:index])
    if index is not None and args[index] == agent_cmd.NAME and "--help" not in args[:index]:
        return agent_cmd.run(args[index + 1 :], before=args[:index])
    from siterecovery.cli.app import run_app

    return run_app(args, names, as_json=as_json)


def fail(error: dict[str, Any], *, as_json: bool, code: int | None = None) -> int:
    """Print an error body (JSON on stdout, or red on stderr); its exit code."""
    if as_json:
        print_json({"error": dict(error)})
    else:
        from siterecovery.cli import render

        render.print_error(error)
    return exit_code(str(error["code"])) if code is None else code


def usage_error(error: UsageError, *, as_json: bool) -> int:
    """A command line argparse refused: exit 2; argparse's usage and message on
    stderr, or the same USAGE document as Click's usage errors with --json."""
    code = EXIT_CODES[Category.USAGE]
    if as_json:
        return fail(
            {"code": "USAGE", "message": str(error), "details": {}}, as_json=True, code=code
        )
    sys.stderr.write(f"{error.usage}{error.prog}: error: {error}\n")
    return code


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run and exit with the command's code."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
