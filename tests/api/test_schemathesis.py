"""Bad input through the API, fuzzed: schemathesis against the live daemon's OpenAPI.

Every operation of ``/openapi.json`` gets a bounded number of generated
requests, valid (positive) and invalid (negative), with the bearer token,
derandomized so that CI is reproducible. Whatever arrives, the daemon must
never answer 5xx, and every 4xx must be one of our error documents
(``{"error": {"code", "message", "details"}}``) with a code of the error tree.

The fuzzer calls destructive routes too (lab down, VM deletion, failovers):
that is the point. A site path it generates is moved under this test's
directory first, so that even a confinement bug cannot create or delete
anything outside it (the confinement itself is tested in test_strict_input.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode

from siterecovery.domain.errors import all_error_classes

from ..conftest import Daemon

EXAMPLES = 20
"""Generated requests per operation and generation mode (before de-duplication)."""
BUDGET = 240.0
"""Seconds for the whole run; past it the test fails rather than run on."""
CODES = {cls.code for cls in all_error_classes()}
KNOWN = ("web01", "db01", "onprem", "cloud", "hv01")
"""Names of the lab, put into some cases' path parameters: random strings only
ever reach "not found", these reach the code behind it."""


class Tally:
    """What the fuzzer sent and what came back."""

    def __init__(self) -> None:
        self.requests = 0
        self.statuses: Counter[int] = Counter()
        self.problems: list[str] = []

    def record(self, case: Case, response: schemathesis.Response) -> None:
        self.requests += 1
        self.statuses[response.status_code] += 1
        problem = _problem(response)
        if problem and len(self.problems) < 20:
            where = f"{case.method} {case.formatted_path} query={case.query} body={case.body!r}"
            self.problems.append(f"{where[:300]} -> {response.status_code}: {problem}")


def _problem(response: schemathesis.Response) -> str | None:
    status = response.status_code
    if status >= 500:
        return f"server error {response.text[:300]}"
    if status < 400:
        return None
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        return f"not our error document: {response.text[:300]}"
    if code not in CODES or not isinstance(message, str) or not message:
        return f"code {code!r} is not one of the error tree's: {response.text[:300]}"
    return None


def _known(case: Case, name: str | None) -> None:
    if name is not None and case.path_parameters:
        case.path_parameters = {key: name for key in case.path_parameters}


def _confined(case: Case, root: Path) -> None:
    """Keep a generated site path under ``root`` (a bug must not escape the test)."""
    if case.method == "POST" and case.path == "/api/v1/sites" and isinstance(case.body, dict):
        path = case.body.get("path")
        if isinstance(path, str) and not path.startswith(f"{root}/"):
            case.body["path"] = str(root / quote(path, safe="")[:200])


NAMES = {
    GenerationMode.POSITIVE: st.sampled_from((None, *KNOWN)),
    GenerationMode.NEGATIVE: st.none(),
}


@pytest.mark.timeout(600)
def test_fuzzed_requests_never_fail_the_server(
    daemon: Daemon, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    assert daemon.client is not None
    root = str(daemon.client.base_url).removesuffix("/").removesuffix("/api/v1")
    document = httpx.get(f"{root}/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    sites = tmp_path / "fuzzed-sites"
    sites.mkdir()
    auth = {"Authorization": daemon.client.headers["Authorization"]}
    protect = {"vm": "web01", "to": "cloud", "interval": "1h"}
    assert (
        daemon.wait_job(daemon.call("POST", "/items", json=protect)["job"])["state"] == "succeeded"
    )
    tally, started, operations = Tally(), time.monotonic(), 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            assert time.monotonic() - started < BUDGET, f"over budget at {operation.label}"

            @given(case=operation.as_strategy(generation_mode=mode), name=NAMES[mode])
            @settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case: Case, name: str | None) -> None:
                _known(case, name)
                _confined(case, sites)
                tally.record(case, case.call(base_url=root, headers=auth, timeout=60))

            try:
                fuzz()
            except Unsatisfiable:  # nothing to make invalid: no parameter, no body
                assert mode is GenerationMode.NEGATIVE, operation.label
    elapsed = time.monotonic() - started
    summary = (
        f"schemathesis: {operations} operations, {tally.requests} requests in {elapsed:.0f}s, "
        f"{sum(n for s, n in tally.statuses.items() if s >= 500)} server errors; "
        f"statuses {dict(sorted(tally.statuses.items()))}"
    )
    print("\n" + summary)  # shown with -s; and in the JUnit report:
    record_property("schemathesis", summary)
    assert operations >= 40 and tally.requests >= operations
    assert not tally.problems, "\n".join(tally.problems)
    assert tally.statuses[400] > 0 and sum(n for s, n in tally.statuses.items() if s < 300) > 0
    _nothing_escaped(tmp_path, sites)


def _nothing_escaped(tmp_path: Path, sites: Path) -> None:
    """The fuzzer's sites are all under ``sites``: the test directory holds only
    the vault, the daemon's output and that directory."""
    allowed = {"vault", "daemon.out", sites.name}
    assert {p.name for p in tmp_path.iterdir()} <= allowed
