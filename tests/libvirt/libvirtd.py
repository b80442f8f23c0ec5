"""A private libvirtd per test "host": several independent hosts on one machine.

Each :class:`LibvirtHost` is a :class:`~siterecovery.providers.libvirt.private.PrivateLibvirtd`
(the lab's own hosts, see that module): its own mount and network namespace,
its state in directories under ``dir``, reached by a ``qemu+unix`` URI.
Domains must be ``type='qemu'`` (TCG) on this machine.

The first capabilities request after a start probes qemu (~8 s); a host
seeded with another host's capabilities cache (``seed_cache``) skips that.

Teardown (:meth:`LibvirtHost.stop`), also after a failed test: destroy and
undefine every domain and network, SIGTERM the daemon (SIGKILL after 10 s),
then SIGKILL any qemu whose pid file the host's run directory holds.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from siterecovery.providers.libvirt.private import PrivateLibvirtd, unavailable


def skip_unless_libvirt() -> None:
    """Skip the test when this machine cannot run a private libvirtd."""
    why = unavailable()
    if why is None and shutil.which("virsh") is None:
        why = "virsh is not installed (apt-get install libvirt-clients)"
    if why is not None:
        pytest.skip(why)
    pytest.importorskip("libvirt")


class LibvirtHost(PrivateLibvirtd):
    """One private libvirtd, a child of the test; its stop leaves a clean slate."""

    def stop(self, *, undefine: bool = True) -> None:
        super().stop(undefine=undefine)


def mounts_of(directory: Path) -> list[str]:
    """Lines of this process's mount table that mention ``directory`` (expected: none)."""
    text = Path("/proc/self/mountinfo").read_text()
    return [line for line in text.splitlines() if str(directory) in line]


@contextlib.contextmanager
def running_hosts(
    root: Path, names: list[str], seed_cache: Path | None = None
) -> Iterator[list[LibvirtHost]]:
    """Start one private libvirtd per name under ``root/NAME``, capabilities probed;
    all stopped at exit, even when a test (or a later start) fails. Without
    ``seed_cache``, the first host's probe seeds the others (~8 s saved each)."""
    hosts: list[LibvirtHost] = []
    try:
        for name in names:
            host = LibvirtHost(root / name, name)
            hosts.append(host)
            host.prepare(seed_cache=seed_cache)
            host.start()
            host.warm()
            seed_cache = seed_cache or host.dir / "cache"
        yield hosts
    finally:
        for host in hosts:
            host.stop()
