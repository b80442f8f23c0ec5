"""``siterecovery demo``: the Hyper-V failback story, scripted on the lab.

A thin client like every command: it calls the daemon's API step by step and
prints what each step did — the bytes moved, the downtime of phase 2 against
its prediction, and the integrity proof. With ``--json`` it prints one
document with every step.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from siterecovery.cli import render
from siterecovery.cli.client import NO_TIMEOUT, Client, segment
from siterecovery.cli.jobs_cmd import Deadline, long_poll
from siterecovery.cli.session import JsonOpt, Session, VaultOpt

STEPS = (
    "protect",
    "app-consistent point",
    "unplanned failover",
    "commit",
    "the app writes at the cloud site",
    "failback, phase 1",
    "complete failover (phase 2)",
    "commit",
    "reverse replicate",
)


class Story:
    """The demo's steps against one VM; each returns what it shows."""

    def __init__(self, client: Client, vm: str, *, say: bool) -> None:
        self.client, self.vm, self.say = client, vm, say
        self.path = f"/items/{segment(vm)}"
        self.log: list[dict[str, Any]] = []

    def run(self, seconds_at_cloud: float) -> dict[str, Any]:
        item = self._get_item()
        if item is None or item["state"] == "disabled":
            self._job("protect", self.client.post("/items", {"vm": self.vm, "to": "cloud"}))
        point = self.client.post(f"{self.path}/replicate", {"app_consistent": True})["point"]
        self._show("app-consistent point", {"point": point["id"], "type": point["type"]})
        failover = self.client.post(f"{self.path}/failover", {"type": "unplanned"})
        self._job("unplanned failover", failover)
        self._job("commit", self.client.post(f"{self.path}/commit", {}))
        time.sleep(seconds_at_cloud)
        self._show("the app writes at the cloud site", {"seconds": seconds_at_cloud})
        started = self.client.post(f"{self.path}/failover", {"type": "planned", "sync": "delta"})
        phase1 = self._job("failback, phase 1", started)
        self.client.post(f"/jobs/{segment(phase1['id'])}/complete")
        finished = self._job("complete failover (phase 2)", {"job": phase1["id"]})
        self._job("commit", self.client.post(f"{self.path}/commit", {}))
        self._job("reverse replicate", self.client.post(f"{self.path}/reprotect", {}))
        final = self._get_item() or {}
        return {
            "vm": self.vm,
            "steps": self.log,
            "phase2": finished["result"].get("phase2"),
            "integrity": finished["result"].get("integrity"),
            "state": final.get("state"),
            "direction": final.get("direction"),
        }

    def _get_item(self) -> dict[str, Any] | None:
        items: list[dict[str, Any]] = self.client.get("/items")
        return next((i for i in items if i["vm"] == self.vm), None)

    def _job(self, title: str, answer: dict[str, Any]) -> dict[str, Any]:
        job = long_poll(self.client, str(answer["job"]), Deadline.after(None))
        if job["state"] not in ("succeeded", "awaiting-completion"):
            error = job.get("error") or {}
            raise typer.Exit(self._fail(title, error))
        self._show(title, _summary(job))
        return job

    def _fail(self, title: str, error: dict[str, Any]) -> int:
        render.warn(f"{title} failed: {error.get('code')}: {error.get('message')}")
        return 1

    def _show(self, title: str, facts: dict[str, Any]) -> None:
        self.log.append({"step": title, **facts})
        if self.say:
            number = len(self.log)
            text = ", ".join(f"{k} {v}" for k, v in facts.items() if v is not None)
            render.say(f"{number}. {title}: {text}")


def _summary(job: dict[str, Any]) -> dict[str, Any]:
    result = job.get("result") or {}
    phase2 = result.get("phase2") or {}
    integrity = result.get("integrity") or {}
    facts: dict[str, Any] = {
        "job": job["id"],
        "state": job["state"],
        "bytes moved": render.human_bytes(job.get("bytes_done")),
    }
    if phase2:
        predicted_seconds = phase2.get("predicted_seconds") or 0.0
        facts["predicted"] = (
            f"{render.human_bytes(phase2.get('predicted_bytes'))} in {predicted_seconds:.3f} s"
        )
        facts["measured"] = render.human_bytes(phase2.get("bytes"))
        facts["downtime"] = f"{phase2.get('downtime_seconds', 0.0):.3f} s"
    if integrity:
        facts["integrity"] = "digests equal" if integrity.get("equal") else "DIGESTS DIFFER"
    return facts


def demo(
    ctx: typer.Context,
    vm: Annotated[str, typer.Option("--vm", metavar="VM", help="Lab VM to use.")] = "web01",
    seconds: Annotated[
        float,
        typer.Option("--seconds", metavar="S", help="How long the app writes at the cloud site."),
    ] = 3.0,
    vault: VaultOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The Hyper-V failback story on the lab: protect, fail over, fail back, reprotect."""
    with Session.of(ctx, vault, json_out) as session:
        client = session.client
        client.post("/lab/up", read_timeout=NO_TIMEOUT)
        story = Story(client, vm, say=not session.json)
        report = story.run(seconds)
        session.emit(report, lambda doc: render.say(f"done: {doc['vm']} {doc['state']}"))
