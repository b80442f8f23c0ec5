"""The Typer application: the root options and every command of ``COMMANDS``.

cli/main.py imports this module only for the commands that need Typer: the
data-plane commands (``sync``, ``sync-receive``) are argparse commands
(cli/sync_cmd.py) that run without it. They are still listed here, as
commands that forward their raw arguments, so ``siterecovery --help`` shows them.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import typer

# Typer vendors Click; its exceptions are only importable from there.
from typer._click.exceptions import ClickException, UsageError

from siterecovery.cli import sync_cmd
from siterecovery.cli.main import COMMANDS, PROG, fail
from siterecovery.cli.session import Globals, JsonOpt, VaultOpt

FORWARDED = {"ignore_unknown_options": True, "allow_extra_args": True}
"""Click settings of a command whose arguments sync_cmd parses."""


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
        _add(app, name)
    return app


def _add(app: typer.Typer, name: str) -> None:
    if name in sync_cmd.COMMANDS:
        help_ = sync_cmd.HELP[name]
        app.command(name, help=help_, context_settings=FORWARDED, add_help_option=False)(forward)
        return
    module, attribute, group = COMMANDS[name]
    target = getattr(importlib.import_module(f"siterecovery.cli.{module}"), attribute)
    if group:
        app.add_typer(target, name=name)
    else:
        app.command(name)(target)


def forward(ctx: typer.Context) -> None:
    """Run a data-plane command with its raw arguments (sync_cmd parses them)."""
    given = ctx.find_root().obj
    given = given if isinstance(given, Globals) else Globals()
    before = ["--vault", str(given.vault)] if given.vault else []
    if given.json:
        before.append("--json")
    raise typer.Exit(sync_cmd.run(str(ctx.info_name), ctx.args, before=before))


def run_app(args: Sequence[str], names: Sequence[str] | None, *, as_json: bool) -> int:
    """Run ``args`` through the app of the commands ``names``; the exit code.
    Click's own errors are printed here, ours propagate to cli/main.py."""
    try:
        app = build_app(names)
        return _exit_status(app(args=list(args), prog_name=PROG, standalone_mode=False))
    except ClickException as error:
        return click_error(error, as_json=as_json)
    except typer.Abort:
        return fail({"code": "ABORTED", "message": "aborted", "details": {}}, as_json=as_json)


def _exit_status(result: Any) -> int:
    # Without standalone mode Click returns the code of a typer.Exit, else the
    # command's own return value (None for all of ours).
    return result if isinstance(result, int) else 0


def click_error(error: ClickException, *, as_json: bool) -> int:
    """Click's own errors (usage errors exit 2): JSON with --json, else Typer's panel."""
    if as_json:
        code = "USAGE" if isinstance(error, UsageError) else "CLI_ERROR"
        body = {"code": code, "message": error.format_message(), "details": {}}
        return fail(body, as_json=True, code=error.exit_code)
    from typer import rich_utils

    rich_utils.rich_format_error(error)
    return error.exit_code
