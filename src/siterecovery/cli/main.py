"""The ``siterecovery`` command: a thin client of the daemon's REST API.

Parse -> request -> render. Every command takes ``--vault DIR`` and ``--json``
(before or after the subcommand). With ``--json`` a command prints exactly one
JSON document on stdout, errors included (``{"error": {"code", "message",
"details"}}``). Exit codes follow the error's category::

    0  ok                 3  refused by a rule
    1  anything else      4  not found
    2  usage (bad option or value)

Only this module knows exit codes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

import typer

# Typer vendors Click; its exceptions are only importable from there.
from typer._click.exceptions import ClickException, UsageError

from siterecovery.cli import render
from siterecovery.cli.session import Globals, JsonOpt, VaultOpt
from siterecovery.domain.errors import Category, InternalError, SiteRecoveryError, category_of

EXIT_CODES = {Category.USAGE: 2, Category.RULE: 3, Category.NOT_FOUND: 4}
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
    "failover": ("failover_cmd", "failover", False),
    "complete": ("failover_cmd", "complete", False),
    "commit": ("failover_cmd", "commit", False),
    "reprotect": ("failover_cmd", "reprotect", False),
    "cleanup-test": ("failover_cmd", "cleanup_test", False),
    "verify": ("failover_cmd", "verify", False),
    "demo": ("demo_cmd", "demo", False),
    "jobs": ("jobs_cmd", "list_jobs", False),
    "job": ("jobs_cmd", "app", True),
    "sync": ("sync_cmd", "sync", False),
    "sync-receive": ("sync_cmd", "receive", False),
    "key": ("keys_cmd", "app", True),
    "group": ("recovery_cmd", "group_app", True),
    "plan": ("recovery_cmd", "plan_app", True),
}
"""Every command, in help order. Only the command being run is imported (with
its module's dependencies): ``siterecovery sync`` never loads the HTTP client
(start-up time counts for a copy tool; see docs/PERFORMANCE.md)."""


def root(ctx: typer.Context, vault: VaultOpt = None, json_out: JsonOpt = False) -> None:
    """Open, self-hosted site recovery for virtual machines.

    Start a daemon with `siterecovery serve`; the other commands talk to it.
    """
    ctx.obj = Globals(vault=vault, json=json_out)


def build_app(names: Sequence[str] | None = None) -> typer.Typer:
    """The command line with the commands ``names`` (default: all of them)."""
    app = typer.Typer(
        name=PROG,
        help="Open, self-hosted site recovery for virtual machines.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(root)
    for name in names or COMMANDS:
        module, attribute, group = COMMANDS[name]
        target = getattr(importlib.import_module(f"siterecovery.cli.{module}"), attribute)
        if group:
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def command_name(args: Sequence[str]) -> str | None:
    """The command ``args`` run, when it is one of ours (skipping global options)."""
    rest = iter(args)
    for arg in rest:
        if arg == "--vault":
            next(rest, None)
        elif not arg.startswith("-"):
            return arg if arg in COMMANDS else None
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
        name = command_name(args)
        app = build_app([name] if name else None)
        return _exit_status(app(args=args, prog_name=PROG, standalone_mode=False))
    except SiteRecoveryError as error:
        return fail(error.to_dict(), as_json=as_json)
    except ClickException as error:
        return click_error(error, as_json=as_json)
    except typer.Abort:
        return fail({"code": "ABORTED", "message": "aborted", "details": {}}, as_json=as_json)
    except Exception as error:
        if not as_json:
            raise
        return fail(
            InternalError(detail=f"{type(error).__name__}: {error}").to_dict(), as_json=True
        )


def _exit_status(result: Any) -> int:
    # Without standalone mode Click returns the code of a typer.Exit, else the
    # command's own return value (None for all of ours).
    return result if isinstance(result, int) else 0


def fail(error: dict[str, Any], *, as_json: bool, code: int | None = None) -> int:
    render.print_error(error, as_json=as_json)
    return exit_code(str(error["code"])) if code is None else code


def click_error(error: ClickException, *, as_json: bool) -> int:
    """Click's own errors (usage errors exit 2): JSON with --json, else Typer's panel."""
    if as_json:
        code = "USAGE" if isinstance(error, UsageError) else "CLI_ERROR"
        body = {"code": code, "message": error.format_message(), "details": {}}
        return fail(body, as_json=True, code=error.exit_code)
    from typer import rich_utils

    rich_utils.rich_format_error(error)
    return error.exit_code


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: run and exit with the command's code."""
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
