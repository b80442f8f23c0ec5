"""The ReplicaStore contract, run against every implementation.

Every store (``params`` of the ``store`` fixture: the local qcow2 chains, and
page blobs in Azurite) must pass the same tests: a point is listed only once sealed,
its image is its parent's plus what was written (checked by digests of bytes),
a partial point is kept for a resume and discarded otherwise, sealing and
merging are idempotent, deleting keeps exactly the named points.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.domain.errors import PointNotFound
from siterecovery.domain.model import Site, SiteRole
from siterecovery.providers.azure.replicas import AzureBlobReplicaStore
from siterecovery.providers.local.replicas import LocalReplicaStore
from siterecovery.providers.replicas import ReplicaStore

from .azurite import Azurite, azure_site, azurite

MiB = 1 << 20
SIZE = 8 * MiB
ITEM, DISK = "vm1", "d0"


@pytest.fixture(scope="module")
def blob_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with azurite(tmp_path_factory.mktemp("azurite")) as service:
        yield service


@pytest.fixture(params=["local", "azure-blob"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ReplicaStore, Site]]:
    if request.param == "azure-blob":
        service: Azurite = request.getfixturevalue("blob_service")
        yield AzureBlobReplicaStore(), azure_site(service, tmp_path)
        return
    site = Site(name="dr", provider="local", path=str(tmp_path / "site"), role=SiteRole.CLOUD)
    yield LocalReplicaStore(), site


def _write(device: BlockDevice, offset: int, data: bytes) -> None:
    device.write(offset, memoryview(data))


def _image(store: ReplicaStore, site: Site, name: str) -> str:
    with store.open_point(site, ITEM, DISK, name) as device:
        return disk_digest(device)


def _reference(tmp_path: Path, writes: list[tuple[int, bytes]]) -> str:
    """The digest of a raw file holding the same writes (what the point must read as)."""
    path = tmp_path / f"ref-{len(writes)}.raw"
    create_raw(path, SIZE)
    with FileDevice.open(path, writable=True) as device:
        for offset, data in writes:
            _write(device, offset, data)
        return disk_digest(device)


def _point(store: ReplicaStore, site: Site, seq: int, writes: list[tuple[int, bytes]]) -> str:
    with store.begin(site, ITEM, DISK, seq, SIZE) as device:
        for offset, data in writes:
            _write(device, offset, data)
    return store.seal(site, ITEM, DISK, seq)


def test_a_point_is_listed_once_sealed_and_reads_as_written(store, tmp_path: Path) -> None:
    replicas, site = store
    assert replicas.chain(site, ITEM, DISK) == []
    first = [(0, os.urandom(MiB)), (5 * MiB, os.urandom(64 << 10))]
    with replicas.begin(site, ITEM, DISK, 1, SIZE) as device:
        for offset, data in first:
            _write(device, offset, data)
    assert replicas.chain(site, ITEM, DISK) == []  # partial: never listed
    name = replicas.seal(site, ITEM, DISK, 1)
    assert replicas.chain(site, ITEM, DISK) == [name]
    assert replicas.seal(site, ITEM, DISK, 1) == name  # idempotent
    assert _image(replicas, site, name) == _reference(tmp_path, first)

    second = [(MiB // 2, os.urandom(MiB))]
    newer = _point(replicas, site, 2, second)
    assert replicas.chain(site, ITEM, DISK) == [name, newer]
    assert _image(replicas, site, newer) == _reference(tmp_path, first + second)
    assert _image(replicas, site, name) == _reference(tmp_path, first)  # sealed: unchanged
    assert replicas.space_used(site, ITEM) > MiB
    free = replicas.space_free(site)
    assert free is None or free > 0


def test_a_partial_point_is_resumed_or_discarded(store, tmp_path: Path) -> None:
    replicas, site = store
    base = [(0, os.urandom(MiB))]
    _point(replicas, site, 1, base)
    half = [(2 * MiB, os.urandom(MiB))]
    with replicas.begin(site, ITEM, DISK, 2, SIZE) as device:
        _write(device, *half[0])
    # Reopened with the same seq: what was written is still there (a resume).
    rest = [(4 * MiB, os.urandom(MiB))]
    with replicas.begin(site, ITEM, DISK, 2, SIZE) as device:
        _write(device, *rest[0])
    name = replicas.seal(site, ITEM, DISK, 2)
    assert _image(replicas, site, name) == _reference(tmp_path, base + half + rest)

    with replicas.begin(site, ITEM, DISK, 3, SIZE) as device:
        _write(device, 0, os.urandom(MiB))
    replicas.discard(site, ITEM, DISK)
    with replicas.begin(site, ITEM, DISK, 3, SIZE):
        pass  # a fresh partial: nothing of the discarded one
    fresh = replicas.seal(site, ITEM, DISK, 3)
    assert _image(replicas, site, fresh) == _reference(tmp_path, base + half + rest)


def test_a_point_sealed_but_never_recorded_is_replaced_not_built_upon(
    store, tmp_path: Path
) -> None:
    """A pass that died between its seal and its record left a sealed point the
    vault never numbered; the next pass gets the same number: its point is on
    the last recorded parent, and the stray point is gone (a point backed by
    itself, or on a stray, would be a corrupt chain)."""
    replicas, site = store
    base = [(0, os.urandom(MiB))]
    recorded = _point(replicas, site, 1, base)
    _point(replicas, site, 2, [(3 * MiB, os.urandom(MiB))])  # sealed, then the pass died
    again = [(6 * MiB, os.urandom(MiB))]
    name = _point(replicas, site, 2, again)
    assert replicas.chain(site, ITEM, DISK) == [recorded, name]
    assert _image(replicas, site, name) == _reference(tmp_path, base + again)
    assert _image(replicas, site, recorded) == _reference(tmp_path, base)


def test_merge_folds_a_point_into_its_parent_and_is_idempotent(store, tmp_path: Path) -> None:
    replicas, site = store
    writes = [[(i * MiB, os.urandom(MiB))] for i in range(3)]
    names = [_point(replicas, site, seq + 1, w) for seq, w in enumerate(writes)]
    expected = {n: _image(replicas, site, n) for n in names}
    # Drop the first point: the second's image moves into the first's name.
    for _ in range(2):
        replicas.merge(site, ITEM, DISK, child=names[1], parent=names[0], grandchild=names[2])
    assert replicas.chain(site, ITEM, DISK) == [names[0], names[2]]
    assert _image(replicas, site, names[0]) == expected[names[1]]
    assert _image(replicas, site, names[2]) == expected[names[2]]


def test_delete_keeps_exactly_the_named_points(store) -> None:
    replicas, site = store
    names = [_point(replicas, site, seq, [(0, os.urandom(4096))]) for seq in (1, 2)]
    assert replicas.delete(site, ITEM, keep=frozenset(names[:1])) == names[:1]
    assert replicas.chain(site, ITEM, DISK) == names[:1]
    assert replicas.delete(site, ITEM) == []
    assert replicas.chain(site, ITEM, DISK) == []
    assert replicas.delete(site, ITEM) == []  # idempotent
    assert replicas.space_used(site, ITEM) == 0


def test_an_unknown_point_is_not_found(store) -> None:
    replicas, site = store
    _point(replicas, site, 1, [])
    for name in ("p000009.qcow2", "../../etc/passwd", "p000001.qcow2.partial"):
        with pytest.raises(PointNotFound), replicas.open_point(site, ITEM, DISK, name):
            pass


def test_a_point_never_begun_cannot_be_sealed(store) -> None:
    """A pass whose partial point is gone (discarded under it) must not record a
    point on nothing: sealing it is refused and lists nothing."""
    replicas, site = store
    first = _point(replicas, site, 1, [(0, os.urandom(MiB))])
    with pytest.raises(PointNotFound):
        replicas.seal(site, ITEM, DISK, 2)
    assert replicas.chain(site, ITEM, DISK) == [first]
    with replicas.begin(site, ITEM, DISK, 2, SIZE) as device:
        _write(device, 0, os.urandom(4096))
    replicas.discard(site, ITEM, DISK)
    with pytest.raises(PointNotFound):
        replicas.seal(site, ITEM, DISK, 2)
    assert replicas.chain(site, ITEM, DISK) == [first]
