"""Messages to a waiting job: complete, resume, cancel (durable DBOS messages).

A job that waits for the user (a failback in ``awaiting-completion``, a plan
paused on a manual action) blocks in :func:`wait_for` on its ``control``
topic. The message survives a daemon restart: DBOS stores it until the
recovered workflow reads it.
"""

from __future__ import annotations

from dbos import DBOS

from siterecovery.domain.errors import JobCancelled

TOPIC = "control"
COMPLETE, RESUME, CANCEL = "complete", "resume", "cancel"
WAIT_SECONDS = 7 * 24 * 3600.0
"""How long one wait lasts before it waits again (there is no give-up)."""


def send(job_id: str, message: str) -> None:
    DBOS.send(job_id, message, topic=TOPIC)


def wait_for(job_id: str, expected: str) -> None:
    """Block (in workflow code) until ``expected`` arrives; JobCancelled on ``cancel``."""
    while True:
        message = DBOS.recv(TOPIC, timeout_seconds=WAIT_SECONDS)
        if message == expected:
            return
        if message == CANCEL:
            raise JobCancelled(job=job_id)
