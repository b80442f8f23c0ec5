"""The site operations of an agent: ``site.METHOD`` for every method of
:class:`~siterecovery.sites.base.SiteAgent`, run by this agent's
:class:`~siterecovery.sites.local.InProcessAgent` next to the site's disks.

Arguments and results are the JSON forms of the interface's values (a VM is
its ``to_dict``, a receipt, a transfer, frozen disks); ``sites/remote.py``
is the other end.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from siterecovery.agent.registry import Args, Emit, Operations
from siterecovery.sites.base import (
    Image,
    PointRef,
    Receipt,
    Since,
    Transfer,
    host_from_dict,
    vm_from_dict,
)
from siterecovery.sites.local import InProcessAgent

TRANSFERS = (
    "receive_point", "receive_disks", "end_receive", "freeze", "freeze_view", "release",
    "send_disk",
)  # fmt: skip
"""Served only by an agent with a wire port (``agent/wire.py``): without one, a
pass through it fails on ``site.receive_point`` (NOT_FOUND, naming the
operation) and changes nothing."""


def register(ops: Operations, site: InProcessAgent, *, transfers: bool = True) -> None:
    """Register the site operations of ``site`` in ``ops`` (the transfers too
    with ``transfers``)."""

    def vm(args: Args) -> Any:
        return vm_from_dict(args["vm"])

    unary = {
        "prepare": lambda a: site.prepare(storage=a.get("storage", "block")),
        "storage": lambda a: site.storage(),
        "create_vm": lambda a: site.create_vm(
            vm(a),
            point=None if a.get("point") is None else PointRef.from_dict(a["point"]),
            checkpoint=a.get("checkpoint"),
        ),
        "replace_disks": lambda a: site.replace_disks(vm(a)),
        "adopt_vm": lambda a: site.adopt_vm(vm(a), a["item"], int(a["seq"])),
        "set_inconsistent": lambda a: site.set_inconsistent(vm(a), bool(a["value"])),
        "delete_vm": lambda a: site.delete_vm(vm(a)),
        "power": lambda a: site.power(vm(a)).value,
        "add_host": lambda a: site.add_host(host_from_dict(a["host"])),
        "discover": lambda a: site.discover(host_from_dict(a["host"])),
        "import_vm": lambda a: site.import_vm(vm(a), [str(f) for f in a["files"]]).to_dict(),
        "export_point": lambda a: site.export_point(
            PointRef.from_dict(a["point"]), str(a["fmt"]), str(a["to"])
        ),
        "adopt_domain": lambda a: site.adopt_domain(host_from_dict(a["host"]), a["name"]).to_dict(),
        "start_vm": lambda a: site.start_vm(vm(a)),
        "stop_vm": lambda a: site.stop_vm(vm(a), timeout=float(a.get("timeout", 30.0))),
        "guest_state": lambda a: site.guest_state(vm(a)),
        "chain": lambda a: site.chain(a["item"], a["disk"]),
        "receive_point": lambda a: site.receive_point(
            a["item"],
            a["disk"],
            int(a["seq"]),
            int(a["size"]),
            resume=bool(a["resume"]),
            transfer=_transfer(a),
        ).to_dict(),
        "end_receive": lambda a: site.end_receive(
            Receipt.from_dict(a["receipt"]), keep=bool(a["keep"])
        ),
        "seal": lambda a: site.seal(a["item"], int(a["seq"]), list(a["disks"])),
        "discard": lambda a: site.discard(a["item"], a["disk"]),
        "merge": lambda a: site.merge(
            a["item"],
            a["disk"],
            child=a["child"],
            parent=a["parent"],
            grandchild=a.get("grandchild"),
        ),
        "delete_chains": lambda a: site.delete_chains(
            a["item"], keep_for=[vm_from_dict(v) for v in a["keep_for"]]
        ),
        "space_free": lambda a: site.space_free(),
        "location": lambda a: site.location(a["item"], a["disk"]),
        "freeze": lambda a: site.freeze(
            [vm_from_dict(v) for v in a["vms"]],
            a["tag"],
            initial=bool(a["initial"]),
            quiesce=bool(a["quiesce"]),
        ).to_dict(),
        "release": lambda a: site.release(
            vm(a), a["tag"], drop_older=bool(a["drop_older"]), views=bool(a.get("views"))
        ),
        "receive_disks": lambda a: {
            disk: r.to_dict()
            for disk, r in site.receive_disks(
                vm(a), blank=bool(a["blank"]), transfer=_transfer(a)
            ).items()
        },
        "written_since": lambda a: site.written_since(vm(a), a["checkpoint"], a["tag"]),
        "freeze_view": lambda a: site.freeze_view(
            vm(a), a["tag"], since=Since.from_dict(a["since"]), granularity=a.get("granularity")
        ).to_dict(),
        "measure": lambda a: site.measure(vm(a), since=a.get("since")),
        "digests": lambda a: site.digests(Image.from_dict(a["image"]), block=a.get("block")),
        "check": lambda a: site.check(Image.from_dict(a["image"])),
    }
    for name, function in unary.items():
        if transfers or name not in TRANSFERS:
            ops.unary("site." + name)(function)
    if transfers:
        ops.streaming("site.send_disk")(lambda args, emit: _send_disk(site, args, emit))


def _transfer(args: Args) -> Transfer | None:
    """The optional ``transfer`` of a receipt: the key its ticket is sealed with."""
    found = args.get("transfer")
    return None if found is None else Transfer.from_dict(found)


PROGRESS_EVERY = 0.25
"""Seconds between two progress events of a transfer (the last one always
goes): the engine needs a live bar and a cancel check, not one line per chunk
(a 64 MiB pass wrote ~950 of them, each a hop through the event loop)."""


def _throttled(emit: Emit) -> Callable[[int, int], None]:
    last = [float("-inf")]
    guard = threading.Lock()

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        with guard:
            if done < total and now - last[0] < PROGRESS_EVERY:
                return
            last[0] = now
        emit({"progress": [done, total]})

    return progress


def _send_disk(site: InProcessAgent, args: Args, emit: Emit) -> Any:
    extra = args.get("extra_dirty")
    return site.send_disk(
        vm_from_dict(args["vm"]), args["disk"], args["tag"], Receipt.from_dict(args["receipt"]),
        Transfer.from_dict(args["transfer"]), initial=bool(args["initial"]),
        resume=int(args.get("resume", 0)), mode=args.get("mode"),
        extra_dirty=None if extra is None else [(int(a), int(n)) for a, n in extra],
        progress=_throttled(emit), checkpoint=lambda offset: emit({"checkpoint": offset}),
    )  # fmt: skip
