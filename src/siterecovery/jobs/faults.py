"""Fault injection at job steps, for the fault-matrix tests only.

Off unless the daemon's environment sets ``SITERECOVERY_FAULT``: a comma-separated
list of ``KIND:STEP:WHEN:ACTION`` rules, where ``KIND`` is a job kind (``protect``,
``failback``…, or ``*``), ``STEP`` a step name (or ``*``), ``WHEN`` is ``before``
(the step has not run) or ``after`` (its body returned, its result not yet recorded
by DBOS: recovery runs it again) and ``ACTION`` is

- ``kill``: SIGKILL this process, as a crash would (the test restarts the daemon
  on the same vault without the variable);
- ``pause``: create ``GATE/KIND.STEP.WHEN.reached`` and wait until
  ``GATE/KIND.STEP.WHEN.release`` exists (``GATE`` is ``SITERECOVERY_FAULT_GATE``):
  a test holds a job at an exact step while it races another request.

``SITERECOVERY_FAULT_TRACE=FILE`` appends one ``KIND STEP`` line per step run, so
a test can learn a job type's steps from the workflow itself.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT_ENV = "SITERECOVERY_FAULT"
GATE_ENV = "SITERECOVERY_FAULT_GATE"
TRACE_ENV = "SITERECOVERY_FAULT_TRACE"


def _matches(rule: str, kind: str, step: str, when: str) -> str | None:
    parts = rule.strip().split(":")
    if len(parts) != 4:
        return None
    r_kind, r_step, r_when, action = parts
    if r_kind in ("*", kind) and r_step in ("*", step) and r_when == when:
        return action
    return None


def at_step(kind: str, step: str, when: str) -> None:
    """Apply the configured fault for ``kind``'s step ``step`` at ``when`` (if any)."""
    trace = os.environ.get(TRACE_ENV)
    if trace and when == "before":
        with open(trace, "a", encoding="utf-8") as out:
            out.write(f"{kind} {step}\n")
    rules = os.environ.get(FAULT_ENV)
    if not rules:
        return
    for rule in rules.split(","):
        action = _matches(rule, kind, step, when)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "pause":
            _pause(f"{kind}.{step}.{when}")


def _pause(name: str) -> None:
    gate = Path(os.environ.get(GATE_ENV) or ".")
    (gate / f"{name}.reached").touch()
    release = gate / f"{name}.release"
    while not release.exists():
        time.sleep(0.05)


def enabled() -> bool:
    return bool(os.environ.get(FAULT_ENV) or os.environ.get(TRACE_ENV))
