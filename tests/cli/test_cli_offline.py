"""The CLI against a test double of the daemon (no real daemon needed).

``DaemonDouble`` is a real HTTP server on 127.0.0.1 (``http.server`` in a
thread) that advertises itself in a temporary vault exactly as the daemon does
(``daemon.json`` + ``token``), checks the bearer token, records every request
and answers canned JSON. It stands in for the daemon only to test the CLI's own
contract: requests sent, output shape, exit codes. The end-to-end tests run
the CLI against the real daemon.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from siterecovery.cli.main import run

TOKEN = "test-token-123"
SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    raw_path: str
    query: dict[str, str]
    authorization: str | None
    body: Any


Answer = tuple[int, Any]
Handler = Callable[[Request], Answer]


class DaemonDouble:
    """A test double of the siterecovery daemon serving canned answers."""

    def __init__(self, vault: Path) -> None:
        self.vault = vault
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[Request] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()
        self.vault.mkdir(parents=True, exist_ok=True)
        (self.vault / "token").write_text(TOKEN + "\n")
        (self.vault / "daemon.json").write_text(json.dumps({"url": self.url, "pid": os.getpid()}))

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def route(self, method: str, path: str, answer: Handler | Answer) -> None:
        """Answer ``method path`` (path below /api/v1) with a fixed answer or a handler."""
        handler = answer if callable(answer) else (lambda _request, fixed=answer: fixed)
        self.routes[(method, "/api/v1" + path)] = handler

    def answer(self, request: Request) -> Answer:
        self.requests.append(request)
        if request.authorization != f"Bearer {TOKEN}":
            return 401, {"error": {"code": "UNAUTHORIZED", "message": "bad token", "details": {}}}
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            return 404, {"detail": "Not Found"}
        return handler(request)


def _handler_class(double: DaemonDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = Request(
                method=method,
                path=unquote(url.path),
                raw_path=url.path,
                query={k: v[-1] for k, v in parse_qs(url.query).items()},
                authorization=self.headers.get("Authorization"),
                body=json.loads(raw) if raw else None,
            )
            status, body = double.answer(request)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@dataclass(frozen=True, slots=True)
class Result:
    code: int
    out: str
    err: str

    def doc(self) -> Any:
        """stdout parsed as exactly one JSON document."""
        return json.loads(self.out)


Cli = Callable[..., Result]


@pytest.fixture
def vault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("SITERECOVERY_VAULT", raising=False)
    return tmp_path / "vault"


@pytest.fixture
def daemon(vault: Path) -> Iterator[DaemonDouble]:
    double = DaemonDouble(vault)
    double.start()
    yield double
    double.stop()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], vault: Path) -> Cli:
    """Run the CLI in this process with ``--vault`` appended; its exit code and output."""

    def invoke(*args: str, vault_option: bool = True) -> Result:
        capsys.readouterr()
        argv = [*args, "--vault", str(vault)] if vault_option else list(args)
        code = run(argv)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


def error_body(code: str, message: str = "refused") -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": {"name": "x"}}}


def job_doc(state: str, *, done: int = 0, error: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "j1",
        "kind": "protect",
        "vm": "web01",
        "state": state,
        "steps": [
            {
                "name": "initial-sync",
                "state": "running",
                "started": None,
                "finished": None,
                "detail": {},
            }
        ],
        "bytes_done": done,
        "bytes_total": 4 << 20,
        "bytes_transferred": done,
        "rate": 1 << 20,
        "eta_seconds": 1.0,
        "error": error,
        "params": {},
        "result": {},
        "allowed_actions": [] if state in ("succeeded", "failed") else ["cancel"],
    }


def sequence(*answers: Answer) -> Handler:
    """A handler answering ``answers`` in turn, then the last one forever."""
    calls: list[Request] = []

    def handler(request: Request) -> Answer:
        calls.append(request)
        return answers[min(len(calls), len(answers)) - 1]

    return handler


# -- help and usage ---------------------------------------------------------------

COMMANDS = [
    [],
    ["init"],
    ["serve"],
    ["lab"],
    ["lab", "up"],
    ["site"],
    ["site", "add"],
    ["site", "list"],
    ["host"],
    ["host", "add"],
    ["host", "list"],
    ["vm"],
    ["vm", "create"],
    ["vm", "list"],
    ["vm", "show"],
    ["vm", "start"],
    ["vm", "stop"],
    ["vm", "check"],
    ["protect"],
    ["replicate"],
    ["items"],
    ["item"],
    ["item", "show"],
    ["disable"],
    ["points"],
    ["jobs"],
    ["job"],
    ["job", "show"],
    ["job", "wait"],
    ["job", "cancel"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_help_of_every_command(cli: Cli, command: list[str]) -> None:
    result = cli(*command, "--help", vault_option=False)
    assert result.code == 0
    assert "Usage: siterecovery" in result.out
    assert "--help" in result.out


def test_bad_option_is_a_usage_error_as_json(cli: Cli) -> None:
    result = cli("jobs", "--no-such-option", "--json")
    assert result.code == 2
    assert result.doc()["error"]["code"] == "USAGE"
    assert "--no-such-option" in result.doc()["error"]["message"]


def test_bad_option_without_json_prints_to_stderr(cli: Cli) -> None:
    result = cli("jobs", "--no-such-option")
    assert result.code == 2
    assert result.out == ""
    assert "--no-such-option" in result.err


def test_missing_argument_is_a_usage_error(cli: Cli) -> None:
    result = cli("protect", "web01", "--json")  # --to is required
    assert result.code == 2
    assert result.doc()["error"]["code"] == "USAGE"


# -- finding the daemon ---------------------------------------------------------------


def test_no_daemon_json_is_daemon_unavailable(cli: Cli, vault: Path) -> None:
    result = cli("jobs", "--json")
    assert result.code == 1
    error = result.doc()["error"]
    assert error["code"] == "DAEMON_UNAVAILABLE"
    assert str(vault) in error["message"]


def test_no_daemon_without_json_says_so_on_stderr(cli: Cli) -> None:
    result = cli("vm", "list")
    assert result.code == 1
    assert result.out == ""
    assert "DAEMON_UNAVAILABLE" in result.err


def test_daemon_json_pointing_nowhere_is_daemon_unavailable(cli: Cli, vault: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    vault.mkdir()
    (vault / "token").write_text(TOKEN)
    (vault / "daemon.json").write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": 1}))
    result = cli("items", "--json")
    assert result.code == 1
    assert result.doc()["error"]["code"] == "DAEMON_UNAVAILABLE"


def test_console_script_without_daemon_prints_one_json_document(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(SRC), "SITERECOVERY_VAULT": str(tmp_path / "v")}
    code = "from siterecovery.cli.main import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "vm", "show", "web01", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["code"] == "DAEMON_UNAVAILABLE"
    assert str(tmp_path / "v") in json.loads(done.stdout)["error"]["details"]["vault"]


# -- requests and answers ---------------------------------------------------------------


def test_bearer_token_is_sent(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("GET", "/sites", (200, []))
    assert cli("site", "list", "--json").code == 0
    assert [r.authorization for r in daemon.requests] == [f"Bearer {TOKEN}"]


def test_jobs_json_is_exactly_the_servers_json(cli: Cli, daemon: DaemonDouble) -> None:
    jobs = [job_doc("running", done=1 << 20), {**job_doc("succeeded"), "id": "j2"}]
    daemon.route("GET", "/jobs", (200, jobs))
    result = cli("jobs", "--json")
    assert result.code == 0
    assert result.doc() == jobs


def test_jobs_without_json_is_a_table(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("GET", "/jobs", (200, [job_doc("running", done=1 << 20)]))
    result = cli("jobs")
    assert result.code == 0
    assert "j1" in result.out and "running" in result.out and "25% of 4.0 MiB" in result.out


@pytest.mark.parametrize(
    ("status", "code", "exit_code"),
    [
        (404, "VM_NOT_FOUND", 4),
        (409, "ALREADY_PROTECTED", 3),
        (400, "INVALID_INPUT", 2),
        (502, "DISK_ERROR", 1),
        (409, "SOME_FUTURE_CODE", 1),
    ],
)
def test_error_codes_map_to_exit_codes(
    cli: Cli, daemon: DaemonDouble, status: int, code: str, exit_code: int
) -> None:
    daemon.route("GET", "/vms/web01", (status, error_body(code, "the server's message")))
    result = cli("vm", "show", "web01", "--json")
    assert result.code == exit_code
    assert result.doc() == {
        "error": {"code": code, "message": "the server's message", "details": {"name": "x"}}
    }


def test_error_without_json_goes_to_stderr(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("GET", "/items/web01", (404, error_body("ITEM_NOT_FOUND", "web01 unprotected")))
    result = cli("item", "show", "web01")
    assert result.code == 4
    assert result.out == ""
    assert "web01 unprotected" in result.err and "ITEM_NOT_FOUND" in result.err


def test_wrong_token_keeps_the_servers_code(cli: Cli, daemon: DaemonDouble, vault: Path) -> None:
    (vault / "token").write_text("not-the-token")
    result = cli("jobs", "--json")
    assert result.code == 1
    assert result.doc()["error"]["code"] == "UNAUTHORIZED"


def test_answer_without_error_body_is_internal(cli: Cli, daemon: DaemonDouble) -> None:
    result = cli("points", "web01", "--json")  # the double has no such route: bare 404
    assert result.code == 1
    assert result.doc()["error"]["code"] == "INTERNAL"
    assert "404" in result.doc()["error"]["message"]


def test_protect_passes_values_through_for_the_server_to_validate(
    cli: Cli, daemon: DaemonDouble
) -> None:
    daemon.route("POST", "/items", (400, error_body("INVALID_INPUT", "interval: negative")))
    result = cli(
        "protect",
        "web01",
        "--to",
        "cloud",
        "--interval",
        "-5s",
        "--threads",
        "-1",
        "--app-consistent-every",
        "-3",
        "--json",
    )
    assert result.code == 2
    assert result.doc()["error"]["code"] == "INVALID_INPUT"
    assert daemon.requests[-1].body == {
        "vm": "web01",
        "to": "cloud",
        "interval": "-5s",
        "threads": -1,
        "app_consistent_every": -3,
        "verify_points": False,
    }


def test_protect_prints_the_job_id(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("POST", "/items", (202, {"job": "j1", "item": {"vm": "web01"}}))
    result = cli("protect", "web01", "--to", "cloud", "--max-rate", "50M", "--verify-points")
    assert result.code == 0
    assert "j1" in result.out
    assert daemon.requests[-1].body == {
        "vm": "web01",
        "to": "cloud",
        "max_rate": "50M",
        "verify_points": True,
    }


def test_protect_wait_json_prints_the_final_job(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("POST", "/items", (202, {"job": "j1", "item": {"vm": "web01"}}))
    daemon.route(
        "GET",
        "/jobs/j1/wait",
        sequence((200, job_doc("running")), (200, job_doc("succeeded", done=4 << 20))),
    )
    result = cli("protect", "web01", "--to", "cloud", "--wait", "--json")
    assert result.code == 0
    assert result.doc() == job_doc("succeeded", done=4 << 20)


def test_replicate_sends_app_consistent_only_when_asked(cli: Cli, daemon: DaemonDouble) -> None:
    report = {"point": {"id": "p1", "time": "t", "type": "app-consistent"}, "disks": {}}
    daemon.route("POST", "/items/web01/replicate", (200, report))
    assert cli("replicate", "web01", "--json").doc() == report
    assert cli("replicate", "web01", "--app-consistent").code == 0
    assert [r.body for r in daemon.requests] == [{}, {"app_consistent": True}]


def test_query_parameters_and_quoted_names(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("GET", "/vms/a b?/check", (200, {"consistent": True, "errors": []}))
    result = cli("vm", "check", "a b?", "--site", "cloud", "--point", "p7", "--json")
    assert result.code == 0
    assert daemon.requests[-1].raw_path == "/api/v1/vms/a%20b%3F/check"
    assert daemon.requests[-1].query == {"site": "cloud", "point": "p7"}


def test_inconsistent_check_exits_1(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("GET", "/vms/web01/check", (200, {"consistent": False, "errors": ["seq 3"]}))
    result = cli("vm", "check", "web01")
    assert result.code == 1
    assert "seq 3" in result.out


def test_site_add_sends_an_absolute_path(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route(
        "POST", "/sites", (201, {"name": "dr", "provider": "local", "path": "/x", "role": "cloud"})
    )
    assert cli("site", "add", "dr", "--path", "rel/dir", "--role", "cloud").code == 0
    body = daemon.requests[-1].body
    assert body == {
        "name": "dr",
        "provider": "local",
        "path": str(Path("rel/dir").absolute()),
        "role": "cloud",
    }


def test_host_add_repeats_switches(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("POST", "/hosts", (201, {"site": "dr", "name": "h1", "switches": ["a", "b"]}))
    assert cli("host", "add", "dr", "h1", "--switch", "a", "--switch", "b", "--json").code == 0
    body = {"site": "dr", "name": "h1", "switches": ["a", "b"], "connected": True}
    assert daemon.requests[-1].body == body


def test_vm_create_body(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("POST", "/vms", (201, {"name": "v1", "site": "dr", "disks": []}))
    result = cli(
        "vm",
        "create",
        "v1",
        "--host",
        "h1",
        "--disk",
        "1G",
        "--disk",
        "64M",
        "--no-workload",
        "--json",
    )
    assert result.code == 0
    assert daemon.requests[-1].body == {
        "name": "v1",
        "host": "h1",
        "disks": ["1G", "64M"],
        "workload": False,
    }


# -- global options --------------------------------------------------------------------


def test_vault_and_json_before_the_subcommand(cli: Cli, daemon: DaemonDouble, vault: Path) -> None:
    daemon.route("GET", "/items", (200, []))
    result = cli("--vault", str(vault), "--json", "items", vault_option=False)
    assert result.code == 0
    assert result.doc() == []


def test_vault_from_the_environment(
    cli: Cli, daemon: DaemonDouble, vault: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SITERECOVERY_VAULT", str(vault))
    daemon.route("GET", "/hosts", (200, [{"site": "dr", "name": "h1", "switches": ["s"]}]))
    result = cli("host", "list", "--site", "dr", "--json", vault_option=False)
    assert result.code == 0
    assert daemon.requests[-1].query == {"site": "dr"}


# -- following jobs ----------------------------------------------------------------------


def test_job_wait_polls_until_succeeded(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route(
        "GET",
        "/jobs/j1",
        sequence(
            (200, job_doc("queued")),
            (200, job_doc("running", done=1 << 20)),
            (200, job_doc("succeeded", done=4 << 20)),
        ),
    )
    result = cli("job", "wait", "j1")
    assert result.code == 0
    assert [r.path for r in daemon.requests] == ["/api/v1/jobs/j1"] * 3
    assert "succeeded" in result.out


def test_job_wait_json_long_polls_and_prints_the_job(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route(
        "GET", "/jobs/j1/wait", sequence((200, job_doc("running")), (200, job_doc("succeeded")))
    )
    result = cli("job", "wait", "j1", "--json")
    assert result.code == 0
    assert result.doc()["state"] == "succeeded"
    assert len(daemon.requests) == 2


def test_job_wait_failed_exits_1_with_the_error(cli: Cli, daemon: DaemonDouble) -> None:
    failure = {"code": "DISK_ERROR", "message": "disk vanished", "details": {}}
    daemon.route("GET", "/jobs/j1", (200, job_doc("failed", error=failure)))
    result = cli("job", "wait", "j1")
    assert result.code == 1
    assert "disk vanished" in result.err


def test_job_wait_awaiting_completion_exits_0(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("GET", "/jobs/j1/wait", (200, job_doc("awaiting-completion")))
    result = cli("job", "wait", "j1", "--json")
    assert result.code == 0
    assert result.doc()["state"] == "awaiting-completion"


def test_job_wait_timeout_returns_the_running_job(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("GET", "/jobs/j1/wait", (200, job_doc("running")))
    result = cli("job", "wait", "j1", "--timeout", "0", "--json")
    assert result.code == 1
    assert result.doc()["state"] == "running"
    assert daemon.requests[-1].query == {"timeout": "0.0"}


def test_job_cancel_and_show(cli: Cli, daemon: DaemonDouble) -> None:
    daemon.route("POST", "/jobs/j1/cancel", (200, job_doc("running")))
    daemon.route("GET", "/jobs/j1", (200, job_doc("running", done=2 << 20)))
    assert cli("job", "cancel", "j1", "--json").doc()["id"] == "j1"
    shown = cli("job", "show", "j1")
    assert shown.code == 0
    assert "initial-sync" in shown.out and "2.0 MiB / 4.0 MiB (50%)" in shown.out


# -- local commands ------------------------------------------------------------------------


def test_init_creates_the_vault_and_prints_one_document(cli: Cli, vault: Path) -> None:
    result = cli("init", "--json")
    assert result.code == 0
    assert result.doc()["vault"] == str(vault.absolute())
    token = (vault / "token").read_text()
    assert token.strip()
    again = cli("init")
    assert again.code == 0
    assert "db_url" in again.out
    assert (vault / "token").read_text() == token  # idempotent


def test_a_slow_answer_is_a_timeout_not_a_missing_daemon(daemon: DaemonDouble, vault: Path) -> None:
    """The daemon accepted the request but answers late: DAEMON_TIMEOUT, which
    says the request may still be carried out — never "start a daemon"."""

    def late(_request: Request) -> Answer:
        time.sleep(3.0)
        return 200, {"vm": "web01", "state": "disabled"}

    daemon.route("POST", "/items/web01/disable", late)
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "SITERECOVERY_VAULT": str(vault),
        "SITERECOVERY_CLIENT_TIMEOUT": "1",
    }
    code = "from siterecovery.cli.main import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, "disable", "web01", "--json"],
        capture_output=True, text=True, env=env, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "DAEMON_TIMEOUT", error
    assert "may still be carrying it out" in error["message"]
    assert "siterecovery serve" not in error["message"]
