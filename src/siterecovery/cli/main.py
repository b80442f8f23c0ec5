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

import sys
from collections.abc import Sequence
from typing import Any

import typer

# Typer vendors Click; its exceptions are only importable from there.
from typer._click.exceptions import ClickException, UsageError

from siterecovery.cli import (
    demo_cmd,
    failover_cmd,
    inventory_cmd,
    jobs_cmd,
    keys_cmd,
    local_cmd,
    protection_cmd,
    recovery_cmd,
    render,
    sync_cmd,
)
from siterecovery.cli.session import Globals, JsonOpt, VaultOpt
from siterecovery.domain.errors import Category, InternalError, SiteRecoveryError, category_of

EXIT_CODES = {Category.USAGE: 2, Category.RULE: 3, Category.NOT_FOUND: 4}
PROG = "siterecovery"

app = typer.Typer(
    name=PROG,
    help="Open, self-hosted site recovery for virtual machines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def root(ctx: typer.Context, vault: VaultOpt = None, json_out: JsonOpt = False) -> None:
    """Open, self-hosted site recovery for virtual machines.

    Start a daemon with `siterecovery serve`; the other commands talk to it.
    """
    ctx.obj = Globals(vault=vault, json=json_out)


app.command("init")(local_cmd.init)
app.command("serve")(local_cmd.serve)
app.add_typer(inventory_cmd.lab_app, name="lab")
app.add_typer(inventory_cmd.site_app, name="site")
app.add_typer(inventory_cmd.host_app, name="host")
app.add_typer(inventory_cmd.vm_app, name="vm")
app.command("protect")(protection_cmd.protect)
app.command("replicate")(protection_cmd.replicate)
app.command("items")(protection_cmd.list_items)
app.add_typer(protection_cmd.item_app, name="item")
app.command("disable")(protection_cmd.disable)
app.command("points")(protection_cmd.list_points)
app.command("failover")(failover_cmd.failover)
app.command("complete")(failover_cmd.complete)
app.command("commit")(failover_cmd.commit)
app.command("reprotect")(failover_cmd.reprotect)
app.command("cleanup-test")(failover_cmd.cleanup_test)
app.command("verify")(failover_cmd.verify)
app.command("demo")(demo_cmd.demo)
app.command("jobs")(jobs_cmd.list_jobs)
app.add_typer(jobs_cmd.app, name="job")
app.command("sync")(sync_cmd.sync)
app.command("sync-receive")(sync_cmd.receive)
app.add_typer(keys_cmd.app, name="key")
app.add_typer(recovery_cmd.group_app, name="group")
app.add_typer(recovery_cmd.plan_app, name="plan")


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
