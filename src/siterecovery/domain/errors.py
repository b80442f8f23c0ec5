"""The one error tree of siterecovery.

Every refusal and failure the product reports is an instance of
:class:`SiteRecoveryError`. Each concrete class has a stable ``code`` (part of
the public contract of the CLI and the API), a ``category`` and a message
``template`` formatted from the keyword fields given at construction. Foreign
errors (libnbd, QMP, SQLAlchemy, subprocess) are translated once, in the
adapter that calls them.

    SiteRecoveryError                      category
    ├── InvalidInput                       usage       bad value, the user must change it
    │   ├── SitePathRefused                usage       a site's storage path is unsafe or taken
    │   └── MethodNotAllowed               usage       an API path without that HTTP method
    ├── Unauthorized                       auth        no or wrong API token
    ├── NotFound                           not-found   a named object does not exist
    │   └── Site/Host/Vm/Item/Point/Job/Key/Group/PlanNotFound
    ├── RuleViolation                      rule        the request is valid but a rule refuses it
    │   ├── OperationNotAllowed            rule        the item's state does not allow it
    │   └── NoRecoveryPoint, FailoverNotCommitted, ReplicationUnhealthy, ProtectionDisabled,
    │       FailedOverVmMissing, HypervisorMismatch, HostDisconnected, SwitchMissing,
    │       TargetVmMissing, NoBlockAccess, GroupMemberAlone, VmInconsistent, VmBusy,
    │       DrillActive, NoDrill, AlreadyExists, AlreadyProtected, SameSite, JobFinished,
    │       GroupTooLarge, AlreadyInGroup, GroupSitesDiffer, GroupIncomplete, PlanEmpty,
    │       PlanWithoutPoints (a NoRecoveryPoint naming every VM without one)…
    ├── Conflict                           conflict    concurrent change, retry
    ├── DiskError                          io          block device, NBD, QMP, qemu-img
    │   ├── BitmapInconsistent             io          change tracking cannot be trusted
    │   ├── DiskFull                       io          no space left (ENOSPC) where data is written
    │   ├── IntegrityError                 io          digests differ after a sync
    │   ├── QmpError                       io          qemu refused a QMP command
    │   ├── QmpTimeout                     io          a QMP monitor stayed silent
    │   ├── WireError, DecryptionFailed    io          the sync protocol between sites
    ├── GuestError                         io          the guest agent (workload) failed
    ├── HypervisorError                    io          libvirt refused or cannot be reached
    ├── KeyUnreadable                      io          the vault master key cannot open a key
    ├── ActionFailed                       io          a recovery plan's script failed
    ├── ChildJobFailed                     io          a VM's job inside a plan's job failed
    ├── JobCancelled                       cancelled   a job was cancelled by the user
    │   └── SyncCancelled
    └── InternalError                      internal    a bug; the message carries the detail

Only ``api/`` knows HTTP statuses and only ``cli/`` knows exit codes; both map
from ``category``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar


class Category(StrEnum):
    USAGE = "usage"
    NOT_FOUND = "not-found"
    RULE = "rule"
    CONFLICT = "conflict"
    IO = "io"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    AUTH = "auth"


class SiteRecoveryError(Exception):
    """Root of every error siterecovery raises on purpose."""

    code: ClassVar[str] = "ERROR"
    category: ClassVar[Category] = Category.INTERNAL
    template: ClassVar[str] = "{detail}"

    def __init__(self, **fields: Any) -> None:
        self.fields = {k: _clipped(v) if k in NAME_FIELDS else v for k, v in fields.items()}
        try:
            message = self.template.format(**self.fields)
        except (KeyError, IndexError):
            message = f"{self.template} {self.fields}"
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructors cannot be rebuilt from ``args``; durable job
        # records pickle errors, so rebuild from the fields and the message.
        return (_restore, (type(self), self.fields, str(self)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape shared by the API and the CLI."""
        details = {k: v for k, v in self.fields.items() if _jsonable(v)}
        return {"code": self.code, "message": self.message, "details": details}


MAX_ECHO = 200
"""Characters of a name the user gave that an error repeats (a 5,000-character
name is not echoed back whole; what the services say of their own is kept)."""
NAME_FIELDS = frozenset({"name", "vm", "site", "host", "switch", "group", "plan", "point", "key"})


def clip(text: str) -> str:
    """``text`` as an error repeats it: whole, or its start and its length."""
    if len(text) <= MAX_ECHO:
        return text
    return f"{text[: MAX_ECHO - 40]}… ({len(text)} characters)"


def _clipped(value: Any) -> Any:
    return clip(value) if isinstance(value, str) else value


def _restore(
    cls: type[SiteRecoveryError], fields: dict[str, Any], message: str
) -> SiteRecoveryError:
    error = Exception.__new__(cls)
    Exception.__init__(error, message)
    error.fields = fields
    return error


def _jsonable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | list | dict) or value is None


class InvalidInput(SiteRecoveryError):
    code = "INVALID_INPUT"
    category = Category.USAGE
    template = "{field}: {reason}"


class SitePathRefused(InvalidInput):
    """A site's storage path that could let deleting a VM remove files not ours."""

    code = "SITE_PATH_REFUSED"
    template = "path: site storage path '{path}' {reason}"


class MethodNotAllowed(InvalidInput):
    code = "METHOD_NOT_ALLOWED"
    template = "{method} is not allowed on {path}"


class Unauthorized(SiteRecoveryError):
    code = "UNAUTHORIZED"
    category = Category.AUTH
    template = "{reason}"


class NotFound(SiteRecoveryError):
    code = "NOT_FOUND"
    category = Category.NOT_FOUND
    template = "{kind} '{name}' does not exist"


class SiteNotFound(NotFound):
    code = "SITE_NOT_FOUND"
    template = "site '{name}' does not exist; `siterecovery site list` shows the sites"


class HostNotFound(NotFound):
    code = "HOST_NOT_FOUND"
    template = "host '{name}' does not exist; `siterecovery host list` shows the hosts"


class VmNotFound(NotFound):
    code = "VM_NOT_FOUND"
    template = "VM '{name}' does not exist{where}; `siterecovery vm list` shows the VMs"

    def __init__(self, *, name: str, site: str | None = None) -> None:
        super().__init__(name=name, site=site, where=f" at site '{site}'" if site else "")


class ItemNotFound(NotFound):
    """No replicated item for VM ``name``; ``vm_exists=False`` when there is no
    VM of that name either (then protecting it is not what to do)."""

    code = "ITEM_NOT_FOUND"
    template = "VM '{name}' is not protected; {hint}"

    def __init__(self, *, name: str, vm_exists: bool = True) -> None:
        hint = (
            f"protect it first with `siterecovery protect {clip(name)} --to SITE`"
            if vm_exists
            else "no VM of that name exists either: `siterecovery vm list` lists the VMs, "
            "`siterecovery items` the protected ones"
        )
        super().__init__(name=name, hint=hint)


class PointNotFound(NotFound):
    code = "POINT_NOT_FOUND"
    template = (
        "recovery point '{name}' does not exist for '{vm}'; `siterecovery points {vm}` lists them"
    )


class JobNotFound(NotFound):
    code = "JOB_NOT_FOUND"
    template = "job '{name}' does not exist; `siterecovery jobs` lists the jobs"


class GroupNotFound(NotFound):
    code = "GROUP_NOT_FOUND"
    template = (
        "replication group '{name}' does not exist; `siterecovery group list` shows the groups"
    )


class PlanNotFound(NotFound):
    code = "PLAN_NOT_FOUND"
    template = "recovery plan '{name}' does not exist; `siterecovery plan list` shows the plans"


class RuleViolation(SiteRecoveryError):
    code = "RULE_VIOLATION"
    category = Category.RULE
    template = "{detail}"


class OperationNotAllowed(RuleViolation):
    code = "OPERATION_NOT_ALLOWED"
    template = "'{operation}' is not allowed while '{vm}' is {state}; allowed now: {allowed}"


class AlreadyExists(RuleViolation):
    code = "ALREADY_EXISTS"
    template = "{kind} '{name}' already exists"


class AlreadyProtected(RuleViolation):
    code = "ALREADY_PROTECTED"
    template = (
        "VM '{vm}' is already protected ({state}, {source} -> {target}); "
        "`siterecovery item show {vm}` shows it, `siterecovery disable {vm}` stops protection"
    )


class SameSite(RuleViolation):
    code = "SAME_SITE"
    template = (
        "VM '{vm}' runs at site '{site}'; the recovery site must be another site "
        "(`siterecovery site list`)"
    )


class VmCopyAtTarget(RuleViolation):
    code = "VM_COPY_AT_TARGET"
    template = (
        "VM '{vm}' already has a copy at site '{site}' (left there by an earlier failover); "
        "protecting toward '{site}' would leave two VMs of that name: delete it first with "
        "`siterecovery vm delete {vm} --site {site}`, or protect toward another site"
    )


class VmInconsistent(RuleViolation):
    code = "VM_INCONSISTENT"
    template = (
        "VM '{vm}' at site '{site}' holds an interrupted sync and its disks are inconsistent; "
        "re-run the failover to resume the sync"
    )


class VmBusy(RuleViolation):
    code = "VM_BUSY"
    template = "VM '{vm}' is {state}; {hint}"


class ItemChanged(RuleViolation):
    code = "ITEM_CHANGED"
    template = (
        "replicated item '{vm}' is {state}, not {expected}: it changed while the job ran; "
        "nothing more was done — look at its jobs, then run the operation again"
    )


class JobFinished(RuleViolation):
    code = "JOB_FINISHED"
    template = "job '{job}' is already {state}; only unfinished jobs can be {action}"


class NoRecoveryPoint(RuleViolation):
    code = "NO_RECOVERY_POINT"
    template = (
        "'{vm}' has no {kind} recovery point at site '{site}'; wait for replication to "
        "seal one (`siterecovery points {vm}`) or pick another point"
    )


class FailoverNotCommitted(RuleViolation):
    code = "FAILOVER_NOT_COMMITTED"
    template = (
        "'{vm}' failed over to '{site}' and the failover is not committed; "
        "run `siterecovery commit {vm}` before failing back"
    )


class ReplicationUnhealthy(RuleViolation):
    code = "REPLICATION_UNHEALTHY"
    template = (
        "reverse replication of '{vm}' ({direction}) is {health}{reason}; failing back needs "
        "it healthy: check `siterecovery item show {vm}` and wait for a new point"
    )


class ProtectionDisabled(RuleViolation):
    code = "PROTECTION_DISABLED"
    template = (
        "protection of '{vm}' is disabled; protect it again with "
        "`siterecovery protect {vm} --to SITE` before any failover"
    )


class FailedOverVmMissing(RuleViolation):
    code = "FAILED_OVER_VM_MISSING"
    template = (
        "the failed-over VM '{vm}' no longer exists at site '{site}' (deleted or moved); "
        "it cannot fail back: protect the VM where it runs now"
    )


class HypervisorMismatch(RuleViolation):
    code = "HYPERVISOR_MISMATCH"
    template = (
        "host '{host}' runs '{kind}' but '{vm}' came from '{expected}'; a VM fails back only "
        "to the hypervisor kind it came from: pick a '{expected}' host"
    )


class HostDisconnected(RuleViolation):
    code = "HOST_DISCONNECTED"
    template = "host '{host}' is not connected; reconnect it or pick another host with --host"


class SwitchMissing(RuleViolation):
    code = "SWITCH_MISSING"
    template = (
        "host '{host}' has no virtual switch '{switch}' for a NIC of '{vm}': add it with "
        "`siterecovery host set {host} --switch {switch}` (a kvm host: a libvirt network or "
        "bridge of that name must exist there), or pick another host with --host"
    )


class TargetVmElsewhere(RuleViolation):
    """A failback asked for another host than the one its target VM is on."""

    code = "TARGET_VM_ELSEWHERE"
    template = (
        "VM '{vm}' exists at site '{site}' on host '{current}', not on '{host}': a failback "
        "into another host is the alternate location, with a new VM; delete that one first "
        "(`siterecovery vm delete {vm} --site {site}`) and pass --create-vm --host {host}, "
        "or leave out --host to fail back into it on {current}"
    )


class TargetVmMissing(RuleViolation):
    code = "TARGET_VM_MISSING"
    template = (
        "VM '{vm}' does not exist on host '{host}' at site '{site}'; pass --create-vm to "
        "create it there (alternate location)"
    )


class NoBlockAccess(RuleViolation):
    code = "NO_BLOCK_ACCESS"
    template = (
        "the disks of '{vm}' at site '{site}' are on '{storage}' storage without block "
        "access; they cannot fail back (the seed: use a storage account, not managed disks)"
    )


class GroupMemberAlone(RuleViolation):
    code = "GROUP_MEMBER_ALONE"
    template = (
        "'{vm}' belongs to replication group '{group}'; its members fail over together: "
        "fail over the group's recovery plan instead"
    )


class GroupTooLarge(RuleViolation):
    code = "GROUP_TOO_LARGE"
    template = (
        "replication group '{group}' would have {size} members; the limit is {limit} "
        "(every member is paused while the group's common point is taken): split the group"
    )


class AlreadyInGroup(RuleViolation):
    code = "ALREADY_IN_GROUP"
    template = (
        "'{vm}' already belongs to replication group '{group}'; remove it there first "
        "(`siterecovery group remove {group} {vm}`)"
    )


class GroupSitesDiffer(RuleViolation):
    code = "GROUP_SITES_DIFFER"
    template = (
        "'{vm}' replicates {direction} but group '{group}' replicates {expected}; the members "
        "of a group replicate between the same two sites"
    )


class GroupIncomplete(RuleViolation):
    code = "GROUP_INCOMPLETE"
    template = (
        "a common point of group '{group}' needs every member protected and idle; {vm} is {state}"
    )


class PlanWithoutPoints(NoRecoveryPoint):
    """The seed's plan rule: a plan fails over (or back) only when every VM has a point."""

    code = "PLAN_VMS_WITHOUT_POINTS"
    template = (
        "recovery plan '{plan}' cannot {operation}: {names} {verb} no recovery point yet; "
        "wait for replication to seal one for each (`siterecovery points VM`)"
    )

    def __init__(self, *, plan: str, operation: str, vms: list[str]) -> None:
        verb = "has" if len(vms) == 1 else "have"
        names = ", ".join(vms)
        super().__init__(plan=plan, operation=operation, vms=vms, names=names, verb=verb)


class PlanEmpty(RuleViolation):
    code = "PLAN_EMPTY"
    template = "recovery plan '{plan}' has no VM; add some with `siterecovery plan add {plan}`"


class KeyRequired(RuleViolation):
    code = "KEY_REQUIRED"
    template = "the data of '{vm}' is encrypted with key '{key}'; pass --key {key}"


class DrillActive(RuleViolation):
    code = "TEST_FAILOVER_ACTIVE"
    template = (
        "a test failover of '{vm}' runs at site '{site}'; clean it up first with "
        "`siterecovery cleanup-test {vm}`"
    )


class NoDrill(RuleViolation):
    code = "NO_TEST_FAILOVER"
    template = "no test failover of '{vm}' to clean up"


class Conflict(SiteRecoveryError):
    code = "CONFLICT"
    category = Category.CONFLICT
    template = "{detail}"


class DaemonUnavailable(SiteRecoveryError):
    code = "DAEMON_UNAVAILABLE"
    category = Category.INTERNAL
    template = (
        "no siterecovery daemon answers for vault '{vault}': {reason}; "
        "start one with `siterecovery serve --vault {vault}`"
    )


class DaemonTimeout(SiteRecoveryError):
    """The daemon accepted the connection but did not answer in time: it is up,
    and the request may have been carried out — never report it as "no daemon"."""

    code = "DAEMON_TIMEOUT"
    category = Category.INTERNAL
    template = (
        "the daemon at {url} did not answer {method} {path} within {seconds:g} s; "
        "it may still be carrying it out: check `siterecovery jobs` and `item show` "
        "before running it again"
    )


class DiskError(SiteRecoveryError):
    code = "DISK_ERROR"
    category = Category.IO
    template = "{detail}"


class BitmapInconsistent(DiskError):
    code = "BITMAP_INCONSISTENT"
    template = (
        "change tracking of '{disk}' is inconsistent (the VM stopped uncleanly); "
        "falling back to a checksum sync"
    )


class DiskViewBusy(DiskError):
    """The hypervisor runs one point-in-time view job per VM and another view
    holds it (libvirt: one backup job per domain). Fields: ``vm``, ``holder``
    (the job's export names) and ``uri``."""

    code = "DISK_VIEW_BUSY"
    template = (
        "the disks of '{vm}' on {uri} are already being read by another view ({holder}): "
        "the hypervisor allows one at a time; wait for that pass or check to end and run "
        "it again (if nothing of siterecovery reads them, end it with "
        "`virsh -c {uri} domjobabort {vm}`)"
    )


class DiskFull(DiskError):
    """A write failed because the filesystem it goes to is full (ENOSPC).

    Fields: ``what`` (the operation), ``where`` (the file, directory or NBD
    export written), ``site`` (the site whose storage it is, when known) and
    ``free`` (bytes free there when known). Raised where ENOSPC is translated
    (the NBD client, qemu-img) and re-raised with the site by whoever knows it.
    """

    code = "DISK_FULL"
    template = (
        "no space left on device for {what}: writing to {where}{at_site} failed ({free_text}); "
        "free space on that filesystem (delete other files there, or keep fewer recovery "
        "points with a shorter retention) or grow it, then run it again"
    )

    def __init__(
        self, *, what: str, where: str, site: str | None = None, free: int | None = None
    ) -> None:
        super().__init__(
            what=what,
            where=where,
            site=site,
            free=free,
            at_site=f" at site '{site}'" if site else "",
            free_text="free space unknown"
            if free is None
            else f"{free / 2**20:.1f} MiB free there",
        )


class IntegrityError(DiskError):
    code = "INTEGRITY_MISMATCH"
    template = "digest of {what} differs: source {source} != target {target}"


class JobCancelled(SiteRecoveryError):
    code = "JOB_CANCELLED"
    category = Category.CANCELLED
    template = "job '{job}' was cancelled"


class PassPreempted(SiteRecoveryError):
    code = "PASS_PREEMPTED"
    category = Category.CANCELLED
    template = (
        "the replication pass of '{vm}' stopped to let {by} run; "
        "nothing it sent is lost: the next pass sends what this one did not"
    )


class InternalError(SiteRecoveryError):
    code = "INTERNAL"
    category = Category.INTERNAL
    template = "{detail}"


def describe(exc: BaseException) -> dict[str, Any]:
    """The JSON error document of any exception (foreign ones become ``INTERNAL``)."""
    if isinstance(exc, SiteRecoveryError):
        return exc.to_dict()
    return {"code": InternalError.code, "message": f"{type(exc).__name__}: {exc}", "details": {}}


def all_error_classes() -> list[type[SiteRecoveryError]]:
    """Every class of the tree, root first (used to map a code back to its class)."""
    seen: list[type[SiteRecoveryError]] = []
    stack: list[type[SiteRecoveryError]] = [SiteRecoveryError]
    while stack:
        cls = stack.pop(0)
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen


def category_of(code: str) -> Category:
    """The category of a stable error code (``INTERNAL`` when unknown)."""
    for cls in all_error_classes():
        if cls.code == code:
            return cls.category
    return Category.INTERNAL


class QmpTimeout(DiskError):
    """A connected QMP monitor sent no greeting or no reply before the deadline."""

    code = "QMP_TIMEOUT"


class QmpError(DiskError):
    """A QMP command was refused by qemu (``error_class`` and ``desc`` from its reply)."""

    code = "QMP_ERROR"
    template = "QMP '{command}' failed: {error_class}: {desc}"


class SyncCancelled(JobCancelled):
    """A sync or a digest stopped because its caller asked (no job id needed).

    Fields: ``what`` (the operation); a sync adds ``resume_offset``, the last
    checkpointed offset, from which a re-run may resume.
    """

    code = "SYNC_CANCELLED"
    template = "{what} was cancelled"


class KeyUnreadable(SiteRecoveryError):
    """A key's stored material does not open with the vault's master key
    (``VAULT/master.key``): the file is missing, damaged or from another vault."""

    code = "KEY_UNREADABLE"
    category = Category.IO
    template = (
        "cannot read key '{name}': the vault master key {path} is missing, damaged or not "
        "the one it was wrapped with; restore {path} from a backup of this vault"
    )


class GuestError(SiteRecoveryError):
    """The lab guest workload refused or failed: its control socket does not
    answer, it could not quiesce, or its disks hold no (or a corrupt) journal."""

    code = "GUEST_AGENT_ERROR"
    category = Category.IO
    template = "{detail}"


class HypervisorError(SiteRecoveryError):
    """A hypervisor host (libvirt) cannot be reached or refused a request.

    Fields: ``uri`` (the libvirt connection URI), ``action`` (what was asked),
    ``detail`` (libvirt's own message) and ``hint`` (what to check, may be empty).
    Raised only by ``providers/libvirt/connection.py``, where libvirt's errors
    are translated.
    """

    code = "HYPERVISOR_ERROR"
    category = Category.IO
    template = "libvirt at {uri}: cannot {action}: {detail}{hint_text}"

    def __init__(self, *, uri: str, action: str, detail: str, hint: str = "") -> None:
        hint_text = f"; {hint}" if hint else ""
        super().__init__(uri=uri, action=action, detail=detail, hint=hint, hint_text=hint_text)


class KeyNotFound(NotFound):
    """An encryption key named by a sync or a policy is not in the vault."""

    code = "KEY_NOT_FOUND"
    template = "key '{name}' does not exist; `siterecovery key list` shows the keys"


class DecryptionFailed(DiskError):
    """A sync stream cannot be decrypted or authenticated: the two sides hold
    different keys (or none on one side), or the data was tampered with."""

    code = "DECRYPTION_FAILED"
    template = "cannot decrypt the sync stream from {peer}: {reason}"


class WireError(DiskError):
    """The sync peer broke the wire protocol, went away, or kept sending corrupt frames."""

    code = "WIRE_ERROR"
    template = "sync peer {peer}: {detail}"


class ActionFailed(SiteRecoveryError):
    """A recovery plan's script action failed or timed out: the plan stops there."""

    code = "ACTION_FAILED"
    category = Category.IO
    template = (
        "action '{action}' of recovery plan '{plan}' failed ({reason}); fix it and run the "
        "plan operation again for the VMs not done yet (`siterecovery plan show {plan}`). "
        "Output: {tail}"
    )


class ChildJobFailed(SiteRecoveryError):
    """A VM's job inside a recovery plan's job failed or was cancelled."""

    code = "PLAN_VM_FAILED"
    category = Category.IO
    template = (
        "the job of '{vm}' ({job}) {state}: {reason}; the plan stops before its next boot "
        "group: `siterecovery job show {job}` says why"
    )


class AgentUnreachable(SiteRecoveryError):
    """The engine cannot reach a site's agent (down, network cut, TLS refused)."""

    code = "AGENT_UNREACHABLE"
    category = Category.IO
    template = (
        "the agent of site '{site}' at {url} is unreachable ({detail}); check that "
        "`siterecovery agent serve` runs there and that the path to it is open"
    )


class AgentCertificateMismatch(SiteRecoveryError):
    """An agent presents a certificate other than the one pinned for it."""

    code = "AGENT_CERT_MISMATCH"
    category = Category.AUTH
    template = (
        "the agent at {url} presents certificate {got}, not the pinned {expected}: another "
        "machine answers at that address, or the agent was re-initialised (make a new join "
        "token on it: `siterecovery agent token`, then `siterecovery site join`)"
    )


class AgentUnauthorized(SiteRecoveryError):
    """A site agent refused a request's credentials (or a peer agent's ticket)."""

    code = "AGENT_UNAUTHORIZED"
    category = Category.AUTH
    template = "{reason}"


class JoinTokenRefused(SiteRecoveryError):
    """A join token that is malformed, unknown, expired or already used."""

    code = "JOIN_TOKEN_REFUSED"
    category = Category.AUTH
    template = (
        "join token refused: {reason}; make a new one on the agent's machine "
        "(`siterecovery agent token --dir DIR`) and use it once"
    )


def error_from_dict(document: Any) -> SiteRecoveryError | None:
    """The error an error document (``to_dict``: code, message, details) describes,
    as the class of its code, with the sender's message (its template is not
    applied again) and details; None when the code is not in the tree or the
    document is not one. The one by-code rebuild for every client of ours."""
    if not isinstance(document, dict) or not isinstance(document.get("code"), str):
        return None
    details = document.get("details")
    for cls in all_error_classes():
        if cls.code == document["code"]:
            fields = dict(details) if isinstance(details, dict) else {}
            return _restore(cls, fields, str(document.get("message", cls.code)))
    return None


class AgentSiteUnsupported(RuleViolation):
    """An operation that does not run through a site agent yet."""

    code = "AGENT_SITE_UNSUPPORTED"
    template = (
        "site '{site}' is served by its agent, and {what} does not run through agents in "
        "this version (replication passes do: protect, replicate, the scheduler); use a "
        "local site for it until failover and failback run through agents"
    )


class StorageUnreachable(DiskError):
    """A site's storage account (Azure Blob, or an emulator) cannot be reached.

    Fields: ``url`` (the account URL, never a key) and ``detail`` (the transport's
    reason). Raised only by ``providers/azure/``, where azure-core errors are translated.
    """

    code = "STORAGE_UNREACHABLE"
    template = (
        "the storage account at {url} cannot be reached ({detail}); check the account URL "
        "in the site's path and that the network path from this agent to it is open"
    )


class StorageCredentialsRefused(DiskError):
    """A site's storage account refused the credentials configured for the site.

    Fields: ``url`` (the account URL), ``source`` (where the credentials were read
    from: a file or an environment variable, never their value) and ``reason``
    (the service's error code).
    """

    code = "STORAGE_CREDENTIALS_REFUSED"
    template = (
        "the storage account at {url} refused the credentials read from {source} ({reason}); "
        "check that it holds the account's current access key or connection string "
        "(keys rotate) for that account, and that this machine's clock is right"
    )


class PointNotMountable(RuleViolation):
    """A recovery point kept where the site's hypervisor cannot base a VM disk on it."""

    code = "POINT_NOT_MOUNTABLE"
    template = (
        "recovery point '{name}' of '{vm}' is a snapshot of the page blob {location}: a VM "
        "cannot run directly on a page-blob point yet (a later version will serve it); "
        "fail over to a site whose replicas are local qcow2 chains"
    )
