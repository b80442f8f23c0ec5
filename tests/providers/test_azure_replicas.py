"""What is specific to the page-blob replica store, against Azurite (no mocks of Azure).

The contract suite (``test_replica_contract.py``) checks what every store does;
here: zeroes are cleared and never uploaded, writes go up in pages of at most
4 MiB, unaligned writes are refused, a snapshot carries its point's metadata,
refused credentials and an unreachable account give errors naming the account
URL and change nothing, and each step finished by a crash is finished by calling
it again. Requests are counted with the store's ``request_hook``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from azure.storage.blob import BlobServiceClient

from siterecovery.disk.base import BlockDevice
from siterecovery.disk.digest import disk_digest
from siterecovery.disk.file import FileDevice, create_raw
from siterecovery.domain.errors import (
    DiskError,
    InvalidInput,
    PointNotFound,
    PointNotMountable,
    StorageCredentialsRefused,
    StorageUnreachable,
)
from siterecovery.domain.model import Site, SiteRole
from siterecovery.providers.azure import replicas as azure_replicas
from siterecovery.providers.azure.config import AzureSiteConfig
from siterecovery.providers.azure.replicas import AzureBlobReplicaStore

from .azurite import KEY, Azurite, _free_port, azure_site, azurite

MiB = 1 << 20
SIZE = 16 * MiB
ITEM, DISK = "vm1", "d0"


class Puts:
    """Counts the Put Page requests that carry data (``x-ms-page-write: update``)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._lock = threading.Lock()

    def __call__(self, request: Any) -> None:
        headers = request.http_request.headers
        if headers.get("x-ms-page-write") == "update":
            with self._lock:
                self.sizes.append(int(headers["Content-Length"]))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with azurite(tmp_path_factory.mktemp("azurite")) as running:
        yield running


@pytest.fixture
def puts() -> Puts:
    return Puts()


@pytest.fixture
def store(puts: Puts) -> AzureBlobReplicaStore:
    return AzureBlobReplicaStore(request_hook=puts)


@pytest.fixture
def site(service: Azurite, tmp_path: Path) -> Site:
    return azure_site(service, tmp_path)


def _digest(store: AzureBlobReplicaStore, site: Site, name: str) -> str:
    with store.open_point(site, ITEM, DISK, name) as device:
        return disk_digest(device)


def _reference(tmp_path: Path, writes: list[tuple[int, bytes]], size: int = SIZE) -> str:
    path = tmp_path / f"ref-{os.urandom(4).hex()}.raw"
    create_raw(path, size)
    with FileDevice.open(path, writable=True) as device:
        for offset, data in writes:
            device.write(offset, memoryview(data))
        return disk_digest(device)


def _point(
    store: AzureBlobReplicaStore, site: Site, seq: int, writes: list[tuple[int, bytes]]
) -> str:
    with store.begin(site, ITEM, DISK, seq, SIZE) as device:
        for offset, data in writes:
            device.write(offset, memoryview(data))
    return store.seal(site, ITEM, DISK, seq)


def _blob(service: Azurite, site: Site) -> Any:
    config = AzureSiteConfig.parse(site.path)
    client = BlobServiceClient.from_connection_string(service.connection_string)
    return client.get_container_client(config.container)


def _holes(device: BlockDevice) -> list[tuple[int, int]]:
    return [(e.start, e.length) for e in device.extents() if e.zero]


def test_zeroes_are_cleared_never_uploaded(store, site, puts: Puts, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    # A parent with data where the child writes zeroes: they must read as a hole.
    _point(store, site, 1, [(MiB, os.urandom(2 * MiB))])
    puts.sizes.clear()
    buffer = data + bytes(2 * MiB) + data
    with store.begin(site, ITEM, DISK, 2, SIZE) as device:
        device.write(0, memoryview(buffer))
        device.zero(8 * MiB, MiB)
        assert _holes(device) == [(MiB, 2 * MiB), (4 * MiB, SIZE - 4 * MiB)]
    assert sum(puts.sizes) == 2 * MiB  # The zeroes never went up.
    name = store.seal(site, ITEM, DISK, 2)
    assert _digest(store, site, name) == _reference(tmp_path, [(0, buffer)])
    with store.open_point(site, ITEM, DISK, name) as point:
        assert _holes(point) == [(MiB, 2 * MiB), (4 * MiB, SIZE - 4 * MiB)]


def test_large_writes_go_up_in_pages_of_at_most_4_mib(store, site, puts: Puts, tmp_path) -> None:
    data = os.urandom(10 * MiB + 512)
    name = _point(store, site, 1, [(512, data)])
    assert max(puts.sizes) <= 4 * MiB
    assert sum(puts.sizes) == len(data)
    assert len(puts.sizes) == 3
    assert _digest(store, site, name) == _reference(tmp_path, [(512, data)])


def test_unaligned_writes_are_refused_and_change_nothing(store, site, puts: Puts) -> None:
    with store.begin(site, ITEM, DISK, 1, SIZE) as device:
        for offset, length in ((100, 512), (512, 1000), (0, 4097)):
            with pytest.raises(DiskError, match="not aligned to 512-byte pages"):
                device.write(offset, memoryview(os.urandom(length)))
        with pytest.raises(DiskError, match="not aligned"):
            device.zero(1, 511)
        assert _holes(device) == [(0, SIZE)]
    assert puts.sizes == []
    with pytest.raises(InvalidInput):
        store.begin(site, ITEM, DISK, 1, SIZE + 1).__enter__()


def test_parallel_writers_on_clones(store, site, tmp_path: Path) -> None:
    writes = [(i * MiB, os.urandom(MiB)) for i in range(0, SIZE // MiB, 2)]
    with store.begin(site, ITEM, DISK, 1, SIZE) as device:

        def write(part: tuple[int, bytes]) -> None:
            clone = device.clone()
            clone.write(part[0], memoryview(part[1]))
            clone.close()

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(write, writes))
    name = store.seal(site, ITEM, DISK, 1)
    assert _digest(store, site, name) == _reference(tmp_path, writes)


def test_a_snapshot_carries_its_point(store, site, service: Azurite) -> None:
    first = _point(store, site, 1, [(0, os.urandom(4096))])
    second = _point(store, site, 2, [(4096, os.urandom(4096))])
    listed = _blob(service, site).list_blobs(include=["snapshots", "metadata"])
    snapshots = {b.metadata["point"]: b for b in listed if b.snapshot}
    assert sorted(snapshots) == [first, second] == ["p000001", "p000002"]
    assert snapshots[first].metadata["seq"] == "1"
    assert snapshots[second].metadata["parent"] == snapshots[first].snapshot
    assert snapshots[second].metadata["size"] == str(SIZE)
    with (
        pytest.raises(DiskError, match="read-only"),
        store.open_point(site, ITEM, DISK, first) as p,
    ):
        p.write(0, memoryview(bytes(512)))


def test_a_wrong_key_is_refused_naming_the_account_and_changes_nothing(
    store, site, service: Azurite, tmp_path: Path
) -> None:
    data = [(0, os.urandom(MiB))]
    name = _point(store, site, 1, data)
    key_file = Path(AzureSiteConfig.parse(site.path).credential_source.removeprefix("file:"))
    bad_key = KEY[:10] + ("A" if KEY[10] != "A" else "B") + KEY[11:]
    wrong_file = tmp_path / "wrong.key"
    wrong_file.touch(mode=0o600)
    wrong_file.write_text(bad_key)
    wrong = replace(site, path=site.path.replace(str(key_file), str(wrong_file)))
    for action in (
        lambda: store.chain(wrong, ITEM, DISK),
        lambda: store.begin(wrong, ITEM, DISK, 2, SIZE).__enter__(),
        lambda: store.delete(wrong, ITEM),
    ):
        with pytest.raises(StorageCredentialsRefused) as refused:
            action()
        assert service.account_url in str(refused.value)
        assert str(wrong_file) in str(refused.value)
        assert bad_key not in str(refused.value) and KEY not in str(refused.value)
    assert store.chain(site, ITEM, DISK) == [name]
    assert _digest(store, site, name) == _reference(tmp_path, data)


def test_an_unreachable_account_is_named(store, tmp_path: Path) -> None:
    port = _free_port()  # Nothing listens there.
    key_file = tmp_path / "k.key"
    key_file.touch(mode=0o600)
    key_file.write_text(KEY)
    url = f"http://127.0.0.1:{port}/devstoreaccount1"
    path = f"{url}/cont1?credential=file:{key_file}&retries=0"
    site = Site(name="gone", provider="azure-blob", path=path, role=SiteRole.CLOUD)
    with pytest.raises(StorageUnreachable) as unreachable:
        store.chain(site, ITEM, DISK)
    assert url in str(unreachable.value)


def test_a_seal_stopped_after_its_snapshot_is_finished(store, site, tmp_path, monkeypatch) -> None:
    base = [(0, os.urandom(MiB))]
    _point(store, site, 1, base)
    more = [(2 * MiB, os.urandom(MiB))]
    with store.begin(site, ITEM, DISK, 2, SIZE) as device:
        device.write(more[0][0], memoryview(more[0][1]))
    with monkeypatch.context() as patch:
        patch.setattr(azure_replicas._Disk, "set_metadata", _crash)
        with pytest.raises(RuntimeError, match="crash"):
            store.seal(site, ITEM, DISK, 2)
    assert store.chain(site, ITEM, DISK) == ["p000001", "p000002"]  # The snapshot is the seal.
    assert store.seal(site, ITEM, DISK, 2) == "p000002"
    third = _point(store, site, 3, [(4 * MiB, bytes(MiB))])
    assert _digest(store, site, third) == _reference(tmp_path, base + more)


def test_a_merge_stopped_halfway_reads_right_and_is_finished(
    store, site, tmp_path, monkeypatch
) -> None:
    writes = [[(i * MiB, os.urandom(MiB))] for i in range(3)]
    names = [_point(store, site, seq + 1, w) for seq, w in enumerate(writes)]
    expected = {n: _digest(store, site, n) for n in names}
    used = store.space_used(site, ITEM)
    with monkeypatch.context() as patch:
        patch.setattr(azure_replicas._Disk, "delete_snapshot", _crash)
        with pytest.raises(RuntimeError, match="crash"):
            store.merge(site, ITEM, DISK, child=names[1], parent=names[0], grandchild=names[2])
    # The name moved in one metadata write: the chain already reads merged.
    assert store.chain(site, ITEM, DISK) == [names[0], names[2]]
    assert _digest(store, site, names[0]) == expected[names[1]]
    store.merge(site, ITEM, DISK, child=names[1], parent=names[0], grandchild=names[2])
    assert store.space_used(site, ITEM) < used  # The parent's old snapshot is gone.
    # A later merge of the renamed point, and a point after it, still read right.
    store.merge(site, ITEM, DISK, child=names[2], parent=names[0], grandchild=None)
    assert store.chain(site, ITEM, DISK) == [names[0]]
    assert _digest(store, site, names[0]) == expected[names[2]]
    four = _point(store, site, 4, [(5 * MiB, os.urandom(4096))])
    assert store.chain(site, ITEM, DISK) == [names[0], four]


def test_a_restored_base_never_changes_the_point_it_came_from(store, site, tmp_path) -> None:
    """Azurite's Copy Blob shares page ranges with its source: the store must not
    let writes to a base restored from a point show up in that point."""
    base = [(0, os.urandom(MiB))]
    name = _point(store, site, 1, base)
    with store.begin(site, ITEM, DISK, 2, SIZE) as device:
        device.write(MiB, memoryview(os.urandom(MiB)))
    store.discard(site, ITEM, DISK)  # A server-side restore of p000001.
    with store.begin(site, ITEM, DISK, 2, SIZE) as device:
        assert _holes(device)[0] == (MiB, SIZE - MiB)
        device.write(3 * MiB, memoryview(os.urandom(MiB)))
    assert _digest(store, site, name) == _reference(tmp_path, base)


def test_points_are_not_mountable_yet_and_unknown_ones_not_found(store, site) -> None:
    name = _point(store, site, 1, [(0, os.urandom(4096))])
    with pytest.raises(PointNotMountable, match="page blob"):
        store.point_image(site, ITEM, DISK, name)
    with pytest.raises(PointNotFound):
        store.point_image(site, ITEM, DISK, "p000002")
    assert store.location(site, ITEM, DISK).endswith(f"/{ITEM}/{DISK}")
    assert store.space_free(site) is None


def test_adopt_uploads_the_image_and_removes_it(store, site, puts: Puts, tmp_path) -> None:
    image = tmp_path / "disk.raw"
    create_raw(image, SIZE)
    writes = [(MiB, os.urandom(MiB)), (9 * MiB, os.urandom(4096))]
    with FileDevice.open(image, writable=True) as device:
        for offset, data in writes:
            device.write(offset, memoryview(data))
    expected = _reference(tmp_path, writes)
    assert store.adopt(site, ITEM, DISK, 5, image) == "p000005"
    assert not image.exists()
    assert sum(puts.sizes) == MiB + 4096
    assert store.adopt(site, ITEM, DISK, 5, image) == "p000005"  # Idempotent.
    assert _digest(store, site, "p000005") == expected


def test_site_config_names_no_secret(tmp_path: Path, monkeypatch) -> None:
    config = AzureSiteConfig.parse(
        "https://acct.blob.core.windows.net/replicas?credential=env:DR_KEY"
    )
    assert (config.account_url, config.account_name, config.container) == (
        "https://acct.blob.core.windows.net", "acct", "replicas",
    )  # fmt: skip
    monkeypatch.setenv("DR_KEY", KEY)
    assert KEY not in repr(config) and config.credential().named_key == ("acct", KEY)
    open_file = tmp_path / "open.key"
    open_file.write_text(KEY)
    open_file.chmod(0o644)
    loose = AzureSiteConfig.parse(
        f"http://127.0.0.1:1/devstoreaccount1/c01?credential=file:{open_file}"
    )
    assert loose.account_name == "devstoreaccount1"
    with pytest.raises(InvalidInput, match="readable by other users"):
        loose.credential()
    for bad in ("ftp://x/c", "https://acct.blob.core.windows.net", "https://a.b/c?credential=k"):
        with pytest.raises(InvalidInput):
            AzureSiteConfig.parse(bad)


def _crash(*args: object, **kwargs: object) -> None:
    raise RuntimeError("crash")
