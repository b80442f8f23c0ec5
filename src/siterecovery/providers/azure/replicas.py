"""The ``azure-blob`` replica store: recovery-point chains as page-blob snapshots.

Layout, in the site's container (:mod:`siterecovery.providers.azure.config`
says how a site names it): one page blob ``ITEM/DISK`` per disk of an item.

* **The base blob is the working copy.** Its content is the newest sealed point,
  or that point plus what a partial point wrote. Its metadata ``state`` says which:
  ``blank`` (created empty), ``sealed SNAPSHOT`` (content equals that snapshot),
  or ``partial SEQ PARENT`` (partial point ``SEQ`` begun on snapshot ``PARENT``,
  ``-`` for none). A partial point is therefore never listed and never read.
* **A sealed point is a blob snapshot**, whose immutable metadata carries
  ``seq``, ``point`` (the name it was sealed as: ``p000001``…), ``parent`` (the
  snapshot it was begun on) and ``size``. Each snapshot is a whole image: a
  point reads as itself, whatever happens to its parents.
* **Names** are ``pNNNNNN`` (no file suffix). A point's name is its snapshot's
  ``point``, unless the base blob's metadata maps the snapshot to another name:
  ``nDIGITS = pNNNNNN`` where DIGITS are the snapshot id's digits. Merges write
  those (snapshots are immutable). When two snapshots carry the same name (a
  merge that stopped halfway), the one sealed later holds it; the other is left
  over, and deleted by the next merge, begin or delete. :meth:`chain` lists
  names, oldest first. Base-blob metadata is limited to 8 KiB: about 250 merges
  that are still alive per disk.
* ``begin(seq)``: delete sealed points named ``seq`` or later (and leftovers);
  then reopen the partial when the state is ``partial SEQ PARENT`` with PARENT the
  newest remaining snapshot; otherwise make the base read as PARENT — a metadata
  write when the state says it already does, else a server-side copy of the
  snapshot onto the base (or a new blank blob) carrying the new state in the same
  request — and resize the blob to ``size``.
* ``seal(seq)``: one ``Snapshot Blob`` call (atomic: the point appears whole or not
  at all), then the state becomes ``sealed SNAPSHOT``. A crash between the two is
  recognised (a snapshot of ``point`` pSEQ on the same parent exists) and finished.
* ``discard``: a partial base goes back to the newest snapshot (server-side copy),
  or the blob is deleted when the chain is empty.
* ``merge(child, parent)``: map child's snapshot to ``parent``'s name (one
  metadata write: from then on ``parent`` reads as child's image and ``child`` is
  gone), then delete the parent's old snapshot. ``grandchild`` needs nothing:
  snapshots do not read through their parents.
* ``delete(keep=...)``: delete the snapshots not kept; a disk keeping none loses
  its blob; one keeping some gets its base cleared (state ``blank``) unless it
  equals a kept point.
* ``space_used``: the sum of the page ranges of every base blob and snapshot of
  the item. An upper bound: Azure bills a page shared by a snapshot and its base
  once, and the page-range diff that would tell which are shared is not used
  (Azurite's is wrong). ``space_free``: None (an account has no useful limit).
* ``location``: the blob's URL. ``point_image`` raises PointNotMountable: a VM
  cannot run on a page-blob point yet. ``adopt`` uploads the image's allocated
  data as point ``seq`` (a copy: a blob cannot take a local file over), then
  removes the image, so that it is moved as the protocol says.

Every step observes the blob's state before acting and acts at most once, so each
method finished by a crash at any step is completed by calling it again. One
writer per disk at a time (the agent's pass lock); readers may run alongside.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import (
    BlobClient,
    BlobProperties,
    BlobServiceClient,
    ContainerClient,
    ExponentialRetry,
)

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.open import open_source
from siterecovery.domain.errors import (
    DiskError,
    InvalidInput,
    PointNotFound,
    PointNotMountable,
)
from siterecovery.domain.model import Site
from siterecovery.providers.azure.config import AzureSiteConfig, translated
from siterecovery.providers.azure.device import PAGE, PageBlobDevice, span

_NAME = re.compile(r"^p(\d{6})$")
_COPY_POLL = 0.2
_COPY_TIMEOUT = 3600.0
_ADOPT_CHUNK = 4 * 1024 * 1024
RequestHook = Callable[..., None]
T = TypeVar("T")


def point_name(seq: int) -> str:
    return f"p{seq:06d}"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    id: str
    point: str
    parent: str
    size: int
    name: str

    @property
    def key(self) -> str:
        return _override_key(self.id)


@dataclass(slots=True)
class _View:
    """What one listing of a disk's blob shows."""

    base: BlobProperties | None = None
    chain: dict[str, _Snapshot] = field(default_factory=dict)
    leftovers: list[_Snapshot] = field(default_factory=list)
    scratch: list[_Snapshot] = field(default_factory=list)
    state: str = "blank"
    recorded_state: str = "blank"

    def head(self) -> _Snapshot | None:
        return self.chain[max(self.chain)] if self.chain else None

    def snapshots(self) -> list[_Snapshot]:
        return [*self.chain.values(), *self.leftovers]

    def metadata(self, state: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The base's metadata with ``state``: the name map of live snapshots kept."""
        names = {s.key: s.name for s in self.snapshots() if s.name != s.point}
        return {**names, **(extra or {}), "state": state}


class _Disk:
    """One disk's blob at a site: its clients and the steps on its state."""

    def __init__(self, config: AzureSiteConfig, container: ContainerClient, blob: str) -> None:
        self.config = config
        self.container = container
        self.name = blob
        self.client: BlobClient = container.get_blob_client(blob)

    @property
    def url(self) -> str:
        return f"{self.config.container_url}/{self.name}"

    def call(self, what: str, action: Callable[[], T]) -> T:
        with translated(self.config, what, self.url):
            return action()

    def observe(self) -> _View:
        listed = self.call("list", self._listing)
        view = _View()
        snapshots: list[tuple[BlobProperties, dict[str, str]]] = []
        for blob in listed:
            if blob.snapshot is None:
                view.base = blob
            elif "point" in (blob.metadata or {}):
                snapshots.append((blob, dict(blob.metadata)))
            elif "scratch" in (blob.metadata or {}):
                view.scratch.append(_Snapshot(str(blob.snapshot), "", "-", 0, "scratch"))
        names = dict(view.base.metadata or {}) if view.base is not None else {}
        for blob, meta in sorted(snapshots, key=lambda pair: (pair[1]["point"], pair[0].snapshot)):
            point, snapshot_id = meta["point"], str(blob.snapshot)
            snapshot = _Snapshot(
                id=snapshot_id, point=point, parent=meta.get("parent", "-"),
                size=int(blob.size), name=names.get(_override_key(snapshot_id), point),
            )  # fmt: skip
            shadowed = view.chain.get(snapshot.name)
            if shadowed is not None:
                view.leftovers.append(shadowed)  # Sorted by point: the later one holds the name.
            view.chain[snapshot.name] = snapshot
        view.chain = dict(sorted(view.chain.items()))
        view.recorded_state = view.state = names.get("state", "blank")
        self._finish_seal(view)
        self._await_copy(view)
        return view

    def _listing(self) -> list[BlobProperties]:
        try:
            blobs = self.container.list_blobs(
                name_starts_with=self.name, include=["snapshots", "metadata", "copy"]
            )
            return [b for b in blobs if b.name == self.name]
        except ResourceNotFoundError:
            return []  # No container yet: no chain.

    def _finish_seal(self, view: _View) -> None:
        """A seal that stopped after its snapshot: the state is that snapshot's."""
        words = view.state.split()
        if len(words) != 3 or words[0] != "partial":
            return
        point, parent = point_name(int(words[1])), words[2]
        for snapshot in view.chain.values():
            if snapshot.point == point and snapshot.parent == parent:
                view.state = f"sealed {snapshot.id}"

    def _await_copy(self, view: _View) -> None:
        """Wait for a pending server-side copy; a failed one leaves an unknown state."""
        deadline = time.monotonic() + _COPY_TIMEOUT
        while view.base is not None and view.base.copy.status == "pending":
            if time.monotonic() > deadline:
                raise DiskError(detail=f"the copy of a point onto {self.url} does not end")
            time.sleep(_COPY_POLL)
            view.base = self.call("read the properties of", self.client.get_blob_properties)
        if view.base is not None and view.base.copy.status in ("failed", "aborted"):
            view.state = "unknown"

    # Steps ----------------------------------------------------------------------

    def ensure_container(self) -> None:
        def create() -> None:
            with suppress(ResourceExistsError):
                self.container.create_container()

        self.call("create the container of", create)

    def delete_snapshot(self, snapshot: _Snapshot) -> None:
        def delete() -> None:
            with suppress(ResourceNotFoundError):
                self.container.get_blob_client(self.name, snapshot=snapshot.id).delete_blob()

        self.call(f"delete point {snapshot.name} of", delete)

    def delete_blob(self) -> None:
        def delete() -> None:
            with suppress(ResourceNotFoundError):
                self.client.delete_blob(delete_snapshots="include")

        self.call("delete", delete)

    def set_metadata(self, view: _View, state: str, extra: dict[str, str] | None = None) -> None:
        metadata = view.metadata(state, extra)
        self.call("write the metadata of", lambda: self.client.set_blob_metadata(metadata))

    def create_blank(self, size: int, state: str) -> None:
        self.call(
            "create",
            lambda: self.client.create_page_blob(size, metadata={"state": state}),
        )

    def restore(self, view: _View, snapshot: _Snapshot, state: str) -> None:
        """Make the base read as ``snapshot``, with ``state``, by server-side copies.

        The copy goes through a scratch snapshot: Azurite's Copy Blob shares the
        source's page-range list by reference, so a base copied straight from a
        point would change that point with its next write (checked in
        ``tests/providers/test_azure_replicas.py``). On Azure it costs two small
        requests more. A crash midway leaves the state ``restoring`` (begin or
        discard restores again) and maybe a scratch snapshot (deleted then).
        """
        self._copy_onto_base(self._url(snapshot.id), view.metadata("restoring"))
        scratch = self.call(
            "snapshot", lambda: self.client.create_snapshot(metadata={"scratch": "1"})
        )
        self._copy_onto_base(self._url(str(scratch["snapshot"])), view.metadata(state))
        self.delete_scratch(self.observe())

    def delete_scratch(self, view: _View) -> None:
        for snapshot in view.scratch:
            self.delete_snapshot(snapshot)

    def _copy_onto_base(self, source: str, metadata: dict[str, str]) -> None:
        self.call(
            "copy a point onto",
            lambda: self.client.start_copy_from_url(source, metadata=metadata),
        )
        self.observe()  # Waits for the copy to end.

    def _url(self, snapshot: str) -> str:
        return str(self.container.get_blob_client(self.name, snapshot=snapshot).url)

    def resize(self, size: int) -> None:
        self.call("resize", lambda: self.client.resize_blob(size))

    def snapshot(self, seq: int, parent: str, size: int) -> str:
        metadata = {"seq": str(seq), "point": point_name(seq), "parent": parent,
                    "size": str(size)}  # fmt: skip
        made = self.call("snapshot", lambda: self.client.create_snapshot(metadata=metadata))
        return str(made["snapshot"])

    def clear(self, size: int) -> None:
        if size:
            self.call("clear", lambda: self.client.clear_page(0, size))

    def page_bytes(self, snapshot: str | None) -> int:
        client = self.container.get_blob_client(self.name, snapshot=snapshot)
        ranges = self.call("list the page ranges of", lambda: list(client.list_page_ranges()))
        spans = [span(r) for r in ranges if not r.cleared]
        return sum(end - start for start, end in spans)


class AzureBlobReplicaStore:
    """Chains as page-blob snapshots in the container each site's path names.

    ``request_hook`` (tests, metrics) is called with every HTTP request before it
    is sent (azure-core's ``raw_request_hook``). Thread-safe.
    """

    def __init__(self, *, request_hook: RequestHook | None = None) -> None:
        self._hook = request_hook
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], BlobServiceClient] = {}

    def chain(self, site: Site, item: str, disk: str) -> list[str]:
        return list(self._disk(site, item, disk).observe().chain)

    @contextmanager
    def begin(self, site: Site, item: str, disk: str, seq: int, size: int) -> Iterator[BlockDevice]:
        if size <= 0 or size % PAGE:
            raise InvalidInput(field="size", reason=f"{size} is not a positive multiple of {PAGE}")
        blob = self._disk(site, item, disk)
        blob.ensure_container()
        view = blob.observe()
        doomed = [s for n, s in view.chain.items() if _seq(n) >= seq] + view.leftovers
        doomed += view.scratch
        for snapshot in doomed:
            blob.delete_snapshot(snapshot)
        if doomed:
            view = blob.observe()
        self._start(blob, view, seq, size)
        with PageBlobDevice(blob.client, blob.config, size, writable=True) as device:
            yield device
            device.flush()

    def _start(self, blob: _Disk, view: _View, seq: int, size: int) -> None:
        """Make the base the partial point ``seq`` on the newest point (kept if it is)."""
        parent = view.head()
        state = f"partial {seq} {parent.id if parent else '-'}"
        current = int(view.base.size) if view.base is not None else 0
        if view.base is not None and view.state == state:
            pass  # Resumed: keep what the partial holds.
        elif parent is None and (view.base is None or view.state != "blank"):
            blob.create_blank(size, state)
            current = size
        elif parent is None or view.state == f"sealed {parent.id}":
            blob.set_metadata(view, state)  # Fast path: the base already reads as parent.
        else:
            blob.restore(view, parent, state)  # Slow path: a server-side copy.
            current = parent.size
        if current != size:
            blob.resize(size)

    def discard(self, site: Site, item: str, disk: str) -> None:
        blob = self._disk(site, item, disk)
        view = blob.observe()
        head = view.head()
        settled = f"sealed {head.id}" if head is not None else "blank"
        if view.base is None or view.state == settled:
            return
        if head is None:
            blob.delete_blob()
        else:
            blob.restore(view, head, f"sealed {head.id}")

    def seal(self, site: Site, item: str, disk: str, seq: int) -> str:
        blob = self._disk(site, item, disk)
        view = blob.observe()
        name = point_name(seq)
        if name in view.chain:
            if view.recorded_state != view.state:
                blob.set_metadata(view, view.state)  # Finish a seal that stopped halfway.
            return name
        parent = view.head()
        if view.base is None or view.state != f"partial {seq} {parent.id if parent else '-'}":
            raise PointNotFound(name=f"{disk}/{name} (partial)", vm=item)
        snapshot = blob.snapshot(seq, parent.id if parent else "-", int(view.base.size))
        blob.set_metadata(view, f"sealed {snapshot}")
        return name

    @contextmanager
    def open_point(self, site: Site, item: str, disk: str, name: str) -> Iterator[BlockDevice]:
        blob = self._disk(site, item, disk)
        snapshot = self._sealed(blob, item, disk, name)
        client = blob.container.get_blob_client(blob.name, snapshot=snapshot.id)
        with PageBlobDevice.snapshot(client, blob.config, snapshot.size) as device:
            yield device

    def merge(self, site: Site, item: str, disk: str, *, child: str, parent: str,
              grandchild: str | None) -> None:  # fmt: skip
        blob = self._disk(site, item, disk)
        view = blob.observe()
        if child in view.chain and parent in view.chain:
            if _seq(child) <= _seq(parent):
                raise InvalidInput(field="child", reason=f"{child} is not newer than {parent}")
            renamed = {view.chain[child].key: parent}
            blob.set_metadata(view, view.state, renamed)
            view = blob.observe()
        if parent not in view.chain:
            raise PointNotFound(name=f"{disk}/{parent}", vm=item)
        for snapshot in view.leftovers:
            blob.delete_snapshot(snapshot)

    def delete(self, site: Site, item: str, *, keep: frozenset[str] = frozenset()) -> list[str]:
        kept: list[str] = []
        for disk in self._disks(site, item):
            blob = self._disk(site, item, disk)
            view = blob.observe()
            names = [n for n in view.chain if n in keep]
            if not names:
                blob.delete_blob()
                continue
            keeping = {view.chain[n].id for n in names}
            for snapshot in [*view.snapshots(), *view.scratch]:
                if snapshot.id not in keeping:
                    blob.delete_snapshot(snapshot)
            settled = {"blank", *(f"sealed {i}" for i in keeping)}
            if view.base is not None and view.state not in settled:
                blob.clear(int(view.base.size))  # The base held a partial or a deleted point.
                blob.set_metadata(blob.observe(), "blank")
            kept.extend(names)
        return kept

    def space_used(self, site: Site, item: str) -> int:
        total = 0
        for disk in self._disks(site, item):
            blob = self._disk(site, item, disk)
            view = blob.observe()
            if view.base is not None:
                total += blob.page_bytes(None)
            total += sum(blob.page_bytes(s.id) for s in view.snapshots())
        return total

    def location(self, site: Site, item: str, disk: str) -> str:
        return self._disk(site, item, disk).url

    def space_free(self, site: Site) -> int | None:
        return None

    # Shared with the site's hypervisor ------------------------------------------

    def point_image(self, site: Site, item: str, disk: str, name: str) -> Path:
        blob = self._disk(site, item, disk)
        self._sealed(blob, item, disk, name)
        raise PointNotMountable(name=name, vm=item, location=blob.url)

    def adopt(self, site: Site, item: str, disk: str, seq: int, image: Path) -> str:
        """Upload ``image``'s allocated data (zero extents cleared) as point ``seq``,
        then remove ``image``. Idempotent: a sealed ``seq`` only removes the image."""
        blob = self._disk(site, item, disk)
        name = point_name(seq)
        if name not in blob.observe().chain:
            if not image.exists():
                raise PointNotFound(name=f"{disk}/{name}", vm=item)
            with ExitStack() as stack:
                source = open_source(str(image), stack)
                with self.begin(site, item, disk, seq, source.size) as target:
                    _copy(source, target)
            self.seal(site, item, disk, seq)
        image.unlink(missing_ok=True)
        return name

    # Helpers --------------------------------------------------------------------

    def _sealed(self, blob: _Disk, item: str, disk: str, name: str) -> _Snapshot:
        snapshot = blob.observe().chain.get(name) if _NAME.match(name) else None
        if snapshot is None:
            raise PointNotFound(name=f"{disk}/{name}", vm=item)
        return snapshot

    def _disk(self, site: Site, item: str, disk: str) -> _Disk:
        config = AzureSiteConfig.parse(site.path)
        container = self._service(config).get_container_client(config.container)
        return _Disk(config, container, f"{_part('item', item)}/{_part('disk', disk)}")

    def _disks(self, site: Site, item: str) -> list[str]:
        config = AzureSiteConfig.parse(site.path)
        container = self._service(config).get_container_client(config.container)
        prefix = f"{_part('item', item)}/"

        def listing() -> list[str]:
            try:
                names = {b.name for b in container.list_blobs(name_starts_with=prefix)}
            except ResourceNotFoundError:
                return []
            return sorted(n[len(prefix) :] for n in names if "/" not in n[len(prefix) :])

        with translated(config, "list the disks of", f"{config.container_url}/{prefix}"):
            return listing()

    def _service(self, config: AzureSiteConfig) -> BlobServiceClient:
        credential = config.credential()
        fingerprint = hashlib.sha256(repr(_secret_of(credential)).encode()).hexdigest()
        key = (f"{config.account_url}|{config.retries}", fingerprint)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = BlobServiceClient(
                    config.account_url,
                    credential=credential,
                    retry_policy=_retry(config.retries),
                    connection_timeout=10,
                    raw_request_hook=self._hook,
                )
                self._clients[key] = client
            return client


def _retry(retries: int) -> ExponentialRetry:
    """Backoff of 1 s, then 1 + 2**n s (and up to 1 s of jitter) for ``retries`` tries."""
    return ExponentialRetry(
        initial_backoff=1, increment_base=2, retry_total=retries, random_jitter_range=1
    )


def _secret_of(credential: object) -> object:
    named = getattr(credential, "named_key", None)
    return named if named is not None else getattr(credential, "signature", None)


def _copy(source: BlockDevice, target: BlockDevice) -> None:
    """Every extent of ``source`` into ``target``: data written, zeroes cleared."""
    buffer = memoryview(bytearray(_ADOPT_CHUNK))
    for extent in source.extents():
        if extent.zero:
            target.zero(extent.start, extent.length)
            continue
        for offset in range(extent.start, extent.end, _ADOPT_CHUNK):
            view = buffer[: min(_ADOPT_CHUNK, extent.end - offset)]
            source.readinto(offset, view)
            target.write(offset, view)


def _override_key(snapshot: str) -> str:
    return "n" + "".join(c for c in snapshot if c.isdigit())


def _seq(name: str) -> int:
    match = _NAME.match(name)
    return int(match.group(1)) if match else -1


def _part(kind: str, name: str) -> str:
    if not name or "/" in name or name in (".", "..") or len(name) > 200:
        raise InvalidInput(field=kind, reason=f"'{name}' cannot name a page blob")
    return name
