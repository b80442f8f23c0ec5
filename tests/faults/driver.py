"""Driving a job to its end across daemon crashes, and telling a stuck job apart.

A job that waits for the user gets its answer once (``complete`` for
``awaiting-completion``, ``resume`` for ``awaiting-action``). After a restart a
job replays its wait: the answer it already received must carry it through,
so a wait answered before the crash is answered again only when the job is
still sitting in it after :data:`REPLAY_GRACE` seconds — and that is noted.

A job is *stuck* when its DBOS workflow has ended (or errored) and the job row
still says it runs: the workflow could not replay its history.
"""

from __future__ import annotations

import base64
import json
import pickle
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx

from ..conftest import Daemon

ANSWERS = {"awaiting-completion": "complete", "awaiting-action": "resume"}
FINISHED = {"succeeded", "failed", "cancelled"}
DBOS_ENDED = {"SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED"}
REPLAY_GRACE = 5.0
STUCK_GRACE = 3.0


class JobStuck(AssertionError):
    """The job row and its workflow disagree, or the job never ends."""


class FaultNotFired(AssertionError):
    """The job ended without reaching the step the fault names."""


class Driver:
    """One case's conversation with a job: the waits answered (across restarts)
    and what had to be said twice."""

    def __init__(self, vault: Path, *, trace: Path | None = None) -> None:
        self.vault = vault
        self.trace = trace
        self.answered: set[str] = set()
        self.notes: list[str] = []
        self.waits_seen: list[str] = []

    def answer(self, daemon: Daemon, job: dict[str, Any], since: float) -> None:
        """Answer the wait the job is in once; again only if a replay sits in it.
        A tracing run writes the wait into the trace, between the job's steps."""
        job_id, state = job["id"], job["state"]
        if state not in self.waits_seen:
            self.waits_seen.append(state)
            if self.trace is not None:
                with self.trace.open("a", encoding="utf-8") as out:
                    out.write(f"{job['kind']} ({state})\n")
        if state in self.answered:
            if time.monotonic() - since < REPLAY_GRACE:
                return
            self.notes.append(f"{ANSWERS[state]} sent again: the restarted job sat in {state}")
        daemon.call("POST", f"/jobs/{job_id}/{ANSWERS[state]}")
        self.answered.add(state)

    def drive(self, daemon: Daemon, job_id: str, *, deadline: float = 120.0) -> dict[str, Any]:
        """Poll until the job finishes, answering its waits; JobStuck otherwise."""
        end = time.monotonic() + deadline
        entered: tuple[str, float] = ("", 0.0)
        ended_at: float | None = None
        while True:
            assert daemon.process is not None
            if daemon.process.poll() is not None:
                raise JobStuck(
                    f"the daemon died (rc {daemon.process.returncode}): {log_tail(self)}"
                )
            job: dict[str, Any] = daemon.call("GET", f"/jobs/{job_id}/wait", params={"timeout": 1})
            state = job["state"]
            if state in FINISHED:
                return job
            if state != entered[0]:
                entered = (state, time.monotonic())
            if state in ANSWERS:
                self.answer(daemon, job, entered[1])
            status = dbos_status(self.vault, job_id)
            if status[0] in DBOS_ENDED:
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > STUCK_GRACE:
                    raise JobStuck(
                        f"job {state} but its workflow is {status[0]}: {status[1]}"
                        f" | daemon log: {log_tail(self)}"
                    )
            if time.monotonic() > end:
                raise JobStuck(
                    f"job still {state} after {deadline:.0f} s (workflow {status[0]})"
                    f" | daemon log: {log_tail(self)}"
                )
            time.sleep(0.1)

    def until_killed(self, daemon: Daemon, job_id: str, *, deadline: float = 120.0) -> None:
        """Answer the job's waits until the fault kills the daemon."""
        assert daemon.process is not None
        end = time.monotonic() + deadline
        entered: tuple[str, float] = ("", 0.0)
        while daemon.process.poll() is None:
            assert time.monotonic() < end, f"the fault did not fire within {deadline:.0f} s"
            try:
                job = daemon.call("GET", f"/jobs/{job_id}")
            except (httpx.HTTPError, AssertionError):
                time.sleep(0.05)  # the daemon is dying under the request
                continue
            if job["state"] in FINISHED:
                raise FaultNotFired(f"job {job['state']} without reaching the fault: {job}")
            if job["state"] != entered[0]:
                entered = (job["state"], time.monotonic())
            if job["state"] in ANSWERS:
                try:
                    self.answer(daemon, job, entered[1])
                except (httpx.HTTPError, AssertionError):
                    continue
            time.sleep(0.05)
        daemon.process.wait()

    def until_state(self, daemon: Daemon, job_id: str, state: str, deadline: float = 120.0) -> None:
        end = time.monotonic() + deadline
        while (found := daemon.call("GET", f"/jobs/{job_id}"))["state"] != state:
            assert found["state"] not in FINISHED, found
            assert time.monotonic() < end, f"job never reached {state}: {found}"
            time.sleep(0.1)
        self.waits_seen.append(state)


def drive(daemon: Daemon, job_id: str, *, deadline: float = 120.0) -> dict[str, Any]:
    """Drive a job without history (setup jobs)."""
    return Driver(daemon.vault).drive(daemon, job_id, deadline=deadline)


def dbos_status(vault: Path, workflow: str) -> tuple[str, str]:
    """DBOS's status of ``workflow`` and its error, read from the system database."""
    path = vault / "dbos.sqlite"
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute(
                "SELECT status, error FROM workflow_status WHERE workflow_uuid = ?", (workflow,)
            ).fetchone()
    except sqlite3.Error as exc:
        return ("UNKNOWN", str(exc))
    if row is None:
        return ("NONE", "")
    return (str(row[0]), _error_text(row[1]))


def _error_text(raw: str | None) -> str:
    if not raw:
        return ""
    try:
        value = pickle.loads(base64.b64decode(raw))  # our own system database
        return f"{type(value).__name__}: {value}"[:600]
    except Exception:  # any other serialisation: show it raw
        try:
            return json.dumps(json.loads(raw))[:600]
        except ValueError:
            return raw[:600]


def log_tail(driver: Driver, lines: int = 6) -> str:
    """The last error lines of the daemon's log (tracebacks' last lines)."""
    path = driver.vault.parent / "daemon.out"
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in text if "Error" in line or "Exception" in line]
    return " / ".join(errors[-lines:])[-1500:] or "(no error in the log)"
