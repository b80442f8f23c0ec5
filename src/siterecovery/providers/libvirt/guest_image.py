"""The lab's real guest: a small Linux assembled from Debian packages only.

:func:`build_guest` fetches ``.deb`` files with ``apt-get download`` (the
Debian registry, nothing else) and makes, in a cache directory:

- ``vmlinuz``: the Debian cloud kernel (the image ``linux-image-cloud-amd64``
  depends on);
- ``initrd.img``: an uncompressed newc cpio written here (no ``cpio`` tool,
  no root: device nodes are cpio entries) holding busybox (PID 1 runs
  ``guest/init``), the virtio modules with their dependencies (from each
  module's ``modinfo``), Debian's python3.11 with just the files of the
  standard library, numpy and xxhash that the workload and the agent load
  (found by running the guest's own interpreter on the build host:
  ``guest/closure.py``), byte-compiled, and the siterecovery modules they
  import (their top-level import closure).

The guest's init starts :mod:`.guest.agent`: the journal workload on
``/dev/vda`` (the same code, hence the same records, that ``vm check``
reads) and a qemu guest agent on the virtio-serial port
``org.qemu.guest_agent.0``.

Why an initramfs and not an ext4 root image: the guest is ~43 MB (python3.11,
liblapack, which numpy links, and numpy's core are half of it); qemu loads it
into guest RAM at host speed and the kernel unpacks it in ~0.5 s under TCG,
while an ext4 root would need a second virtio disk (the guest's only
disk stays the journal's /dev/vda), a busybox stage to mount it and
``switch_root``, and every file it imports read through emulated virtio-blk
requests. Uncompressed, because gunzip is pure guest CPU, which TCG makes slow
(measured: the gzip -6 image, 16.6 MB, took 2.5 s to unpack, the whole boot to
init 1.6 s longer); it fits in 256 MiB of guest RAM with room to spare.

Cache layout (``$SITERECOVERY_GUEST_CACHE`` or ``~/.cache/siterecovery/guest``):
``debs/`` (the downloaded packages, kept), ``images/DIGEST/`` (one built
guest), ``resolved.json`` (the candidate versions, reused while the apt lists
do not change) and ``.lock``. ``DIGEST`` covers the package versions, the
in-guest scripts, the siterecovery sources that go in and this builder, so a
second call with nothing changed returns at once, without apt. Builders of the
same cache serialize on ``fcntl.flock`` of ``.lock``.

Run ``python -m siterecovery.providers.libvirt.guest_image [--cache DIR]`` to
build (or find) the guest and print its paths as JSON.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import siterecovery
from siterecovery.domain.errors import GuestError
from siterecovery.keys.master import write_private

KERNEL_META = "linux-image-cloud-amd64"
"""The Debian metapackage naming the cloud kernel image package."""
PACKAGES = (
    "busybox-static",  # PID 1 (ash), insmod, mount, poweroff
    "libc6",
    "python3.11-minimal",  # the interpreter, libpython linked in
    "libpython3.11-minimal",  # the core of the standard library
    "libpython3.11-stdlib",  # the rest: argparse, json, socketserver, ctypes...
    "zlib1g",
    "libexpat1",
    "libffi8",  # _ctypes (FileDevice calls fallocate through ctypes)
    "libuuid1",  # _uuid
    "python3-numpy",
    "libblas3",
    "liblapack3",
    "libgfortran5",
    "libquadmath0",
    "libgcc-s1",
    "python3-xxhash",
    "libxxhash0",
)
MODULES = ("virtio_pci", "virtio_blk", "virtio_console")
"""Kernel modules the guest loads (their dependencies are found and loaded first)."""
ENTRY_MODULES = (
    "siterecovery.providers.local.workload",
    "siterecovery.providers.libvirt.guest.agent",
)
APPLETS = ("sh", "mount", "insmod", "poweroff", "reboot", "sync", "sleep", "cat", "ls", "dmesg")
FORMAT = 1
"""Bumped when the image layout changes in a way the digest of the sources misses."""

_PACKAGE_ROOT = Path(siterecovery.__file__).resolve().parent
_GUEST_DIR = Path(__file__).resolve().parent / "guest"
_LIBDIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
_LD_SO = "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
_PYTHON = "usr/bin/python3.11"
_OUR_ROOT = "opt/siterecovery"
_DIST_PACKAGES = "usr/lib/python3/dist-packages"
_ALTERNATIVES = {  # What update-alternatives would link (it does not run on `dpkg-deb -x`).
    "usr/lib/x86_64-linux-gnu/libblas.so.3": "blas/libblas.so.3",
    "usr/lib/x86_64-linux-gnu/liblapack.so.3": "lapack/liblapack.so.3",
}
_ALWAYS = ("usr/bin/python3.11", "usr/lib/python3.11/os.py", "bin/busybox")
_APT_STATE = (Path("/var/lib/apt/lists"), Path("/var/lib/dpkg/status"), Path("/etc/apt"))
_TOOL_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class GuestImage:
    """A built guest. ``root_image`` is always None: the root is the initramfs."""

    kernel: Path
    initramfs: Path
    root_image: Path | None
    digest: str
    kernel_release: str

    def cmdline(self, *, rate: float = 20.0, seed: int | None = None, extra: str = "") -> str:
        """A kernel command line: serial console ttyS0, the workload's rate (records/s)
        and seed (of a journal formatted at this boot; an existing one keeps its own)."""
        words = ["console=ttyS0", "quiet", "panic=-1", f"sr.rate={rate:g}"]
        words += [f"sr.seed={seed}"] if seed is not None else []
        return " ".join([*words, extra]).strip()

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def default_cache_dir() -> Path:
    """``$SITERECOVERY_GUEST_CACHE``, else ``~/.cache/siterecovery/guest``."""
    configured = os.environ.get("SITERECOVERY_GUEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "siterecovery" / "guest"


def build_guest(cache_dir: Path | None = None) -> GuestImage:
    """The guest for the current sources and Debian candidates, built if not cached.

    Safe to call concurrently (processes or threads): one builds, the others
    wait on the cache's lock and then find its result. Raises GuestError when
    a package cannot be resolved or downloaded (run ``apt-get update``) or a
    build step fails.
    """
    cache = (cache_dir or default_cache_dir()).resolve()
    (cache / "images").mkdir(parents=True, exist_ok=True)
    versions = _resolved_versions(cache)
    digest = _digest(versions)
    if (found := _load(cache / "images" / digest)) is not None:
        return found  # Fast path.
    with _locked(cache / ".lock"):
        if (found := _load(cache / "images" / digest)) is not None:
            return found  # Another builder finished it while we waited.
        return _build(cache, versions, digest)


# Package versions ----------------------------------------------------------------


def _resolved_versions(cache: Path) -> dict[str, str]:
    """``{package: candidate version}``, the kernel image included; apt-cache runs
    only when the apt lists (or dpkg's status, or apt's configuration) changed."""
    stamp = _apt_stamp()
    saved = cache / "resolved.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        known = json.loads(saved.read_text())
        if known["stamp"] == stamp and known["packages"] == [KERNEL_META, *PACKAGES]:
            return {str(k): str(v) for k, v in known["versions"].items()}
    versions, depends = _ask_apt([KERNEL_META, *PACKAGES])
    kernel = _kernel_package(depends[KERNEL_META])
    del versions[KERNEL_META]
    versions.update(_ask_apt([kernel])[0])
    record = {"stamp": stamp, "packages": [KERNEL_META, *PACKAGES], "versions": versions}
    write_private(saved, json.dumps(record, indent=1, sort_keys=True).encode())
    return versions


def _apt_stamp() -> str:
    """A digest of the names, sizes and mtimes of the files apt decides candidates from."""
    entries = []
    for top in _APT_STATE:
        paths = sorted(top.rglob("*")) if top.is_dir() else [top]
        for path in paths:
            with contextlib.suppress(OSError):
                st = path.stat()
                if stat.S_ISREG(st.st_mode):
                    entries.append(f"{path}\0{st.st_size}\0{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _ask_apt(names: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Candidate versions and Depends lines of ``names``, from ``apt-cache show``."""
    out = _tool(["apt-cache", "show", "--no-all-versions", *names], what="resolve packages")
    found: tuple[dict[str, str], dict[str, str]] = ({}, {})
    package = ""
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key == "Package":
            package = value.strip()
        elif key in ("Version", "Depends") and package:
            found[key == "Depends"][package] = value.strip()
    if missing := [name for name in names if name not in found[0]]:
        raise GuestError(detail=f"Debian packages not found: {', '.join(missing)}")
    return found


def _kernel_package(depends: str) -> str:
    for item in depends.split(","):
        name = item.split()[0]
        if name.startswith("linux-image-"):
            return name
    raise GuestError(detail=f"{KERNEL_META} names no kernel image: {depends}")


# The digest ------------------------------------------------------------------------


def _digest(versions: dict[str, str]) -> str:
    """Hex digest (16 chars) of everything the guest is made from."""
    h = hashlib.sha256(f"format {FORMAT}\n".encode())
    for name, version in sorted(versions.items()):
        h.update(f"{name}={version}\n".encode())
    sources = [Path(__file__).resolve(), *sorted(_GUEST_DIR.iterdir())]
    sources += [_PACKAGE_ROOT / rel for rel in our_sources()]
    for path in sources:
        if path.is_file():
            h.update(f"{path.name}\0{len(path.read_bytes())}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def our_sources(entries: Iterable[str] = ENTRY_MODULES) -> list[str]:
    """Files (relative to the siterecovery package) of ``entries`` and of every
    siterecovery module they import at top level, with their packages' ``__init__``."""
    modules = _module_files()
    todo, seen = list(entries), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += _top_level_imports(name, modules)
    return sorted(str(modules[name].relative_to(_PACKAGE_ROOT)) for name in seen)


def _module_files() -> dict[str, Path]:
    found = {}
    for path in _PACKAGE_ROOT.rglob("*.py"):
        parts = path.relative_to(_PACKAGE_ROOT).with_suffix("").parts
        found[".".join(("siterecovery", *parts)).removesuffix(".__init__")] = path
    return found


def _top_level_imports(name: str, modules: dict[str, Path]) -> list[str]:
    """siterecovery modules ``name`` imports outside functions and ``if`` blocks."""
    names: list[str] = []
    for node in ast.parse(modules[name].read_text()).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return [n for n in names if n in modules]


# Building --------------------------------------------------------------------------


def _build(cache: Path, versions: dict[str, str], digest: str) -> GuestImage:
    started = time.monotonic()
    images = cache / "images"
    for stale in images.glob("*.partial"):
        shutil.rmtree(stale, ignore_errors=True)  # A builder that died; we hold the lock.
    work = images / f"{digest}.partial"
    root = work / "root"
    root.mkdir(parents=True)
    for deb in _download(cache / "debs", versions):
        _tool(["dpkg-deb", "-x", str(deb), str(root)], what=f"extract {deb.name}")
    release = _kernel_release(versions)
    for link, target in _ALTERNATIVES.items():
        (root / link).symlink_to(target)
    _stage_our_sources(root / _OUR_ROOT)
    files = _closure(root)
    entries = list(_entries(root, files, _modules_in_order(root, release)))
    _write_cpio(work / "initrd.img", entries)
    shutil.copyfile(root / "boot" / f"vmlinuz-{release}", work / "vmlinuz")
    shutil.rmtree(root)
    manifest = {
        "digest": digest, "kernel_release": release, "packages": versions,
        "files": len(entries), "initramfs_bytes": (work / "initrd.img").stat().st_size,
        "kernel_bytes": (work / "vmlinuz").stat().st_size,
        "build_seconds": round(time.monotonic() - started, 2),
    }  # fmt: skip
    write_private(work / "manifest.json", json.dumps(manifest, indent=1).encode())
    work.rename(images / digest)
    found = _load(images / digest)
    assert found is not None
    return found


def _load(directory: Path) -> GuestImage | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return GuestImage(
        kernel=directory / "vmlinuz",
        initramfs=directory / "initrd.img",
        root_image=None,
        digest=str(manifest["digest"]),
        kernel_release=str(manifest["kernel_release"]),
    )


def _kernel_release(versions: dict[str, str]) -> str:
    image = next(name for name in versions if name.startswith("linux-image-"))
    return image.removeprefix("linux-image-")


def _download(debs: Path, versions: dict[str, str]) -> list[Path]:
    """The ``.deb`` of each package at its version, downloaded when not in ``debs``."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [name for name, version in versions.items() if not _deb(debs, name, version)]
    if missing:
        wanted = [f"{name}={versions[name]}" for name in missing]
        _tool(["apt-get", "download", "-q", *wanted], what="download packages", cwd=debs)
    found = {name: _deb(debs, name, version) for name, version in versions.items()}
    if lost := [name for name, path in found.items() if path is None]:
        raise GuestError(detail=f"apt-get download left no .deb for {', '.join(lost)}")
    return [path for path in found.values() if path is not None]


def _deb(debs: Path, name: str, version: str) -> Path | None:
    quoted = version.replace(":", "%3a")
    return next(iter(sorted(debs.glob(f"{name}_{quoted}_*.deb"))), None)


def _stage_our_sources(target: Path) -> None:
    for rel in our_sources():
        destination = target / "siterecovery" / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_PACKAGE_ROOT / rel, destination)


def _closure(root: Path) -> set[str]:
    """Paths (relative to ``root``) the guest needs: what the probe loaded, the
    bytecode of its Python files and every symlink leading to one of them."""
    scratch = root.parent / "probe"
    scratch.mkdir()
    probed = json.loads(_guest_python(root, "probe", str(scratch)))
    files = set(_ALWAYS)
    for path in probed["modules"] + probed["libraries"]:
        rel = _relative(root, Path(path))
        if rel is None and ".so" in path:
            raise GuestError(detail=f"the guest's python loaded {path} from the build host")
        files |= {rel} if rel else set()
    files |= {str(p.relative_to(root)) for p in (root / _OUR_ROOT).rglob("*.py")}
    sources = sorted(rel for rel in files if rel.endswith(".py"))
    _guest_python(root, "compile", stdin="".join(f"{root / rel}\t/{rel}\n" for rel in sources))
    files |= {_pyc(rel) for rel in sources}
    return files | _links_to(root, files)


def _guest_python(root: Path, *args: str, stdin: str = "") -> str:
    """Run ``guest/closure.py ARGS`` with the guest's interpreter and libraries."""
    libraries = ":".join(str(root / d) for d in _LIBDIRS)
    argv = [
        str(root / _LD_SO), "--inhibit-cache", "--library-path", libraries, str(root / _PYTHON),
        "-S", "-B", "-P", str(_GUEST_DIR / "closure.py"), *args,
    ]  # fmt: skip
    env = {
        "PYTHONPATH": f"{root / _OUR_ROOT}:{root / _DIST_PACKAGES}",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
    }
    return _tool(argv, what=f"run the guest's python ({args[0]})", env=env, stdin=stdin)


def _pyc(rel: str) -> str:
    path = Path(rel)
    return str(path.parent / "__pycache__" / f"{path.stem}.cpython-311.pyc")


def _relative(root: Path, path: Path) -> str | None:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(root))
    return None


def _links_to(root: Path, files: set[str]) -> set[str]:
    """Symlinks under ``root`` that resolve (inside ``root``) to one of ``files``."""
    found = set()
    for path in root.rglob("*"):
        if path.is_symlink() and _resolve_in(root, path) in files:
            found.add(str(path.relative_to(root)))
    return found


def _resolve_in(root: Path, path: Path, depth: int = 0) -> str | None:
    """Where ``path`` leads in the tree ``root`` as if it were ``/`` (None: outside)."""
    if depth > 40:
        return None
    target = os.readlink(path)
    resolved = root / target.lstrip("/") if target.startswith("/") else path.parent / target
    resolved = Path(os.path.normpath(resolved))
    if resolved.is_symlink():
        return _resolve_in(root, resolved, depth + 1)
    return _relative(root, resolved)


def _modules_in_order(root: Path, release: str) -> list[Path]:
    """The ``.ko`` files of :data:`MODULES` and their dependencies, dependencies first."""
    base = root / "lib" / "modules" / release
    builtin = {Path(line).stem for line in (base / "modules.builtin").read_text().split()}
    known = {path.stem.replace("-", "_"): path for path in (base / "kernel").rglob("*.ko")}
    ordered: list[Path] = []

    def visit(name: str) -> None:
        if name in builtin or known.get(name) in ordered:
            return
        if name not in known:
            raise GuestError(detail=f"kernel {release} has no module {name}")
        for dependency in _module_depends(known[name]):
            visit(dependency)
        ordered.append(known[name])

    for name in MODULES:
        visit(name)
    return ordered


def _module_depends(ko: Path) -> list[str]:
    """The ``depends=`` of a module's modinfo."""
    data = ko.read_bytes()
    at = data.find(b"\0depends=")
    if at < 0:
        return []
    value = data[at + len(b"\0depends=") : data.index(b"\0", at + 1)]
    return [name.replace("-", "_") for name in value.decode().split(",") if name]


# The initramfs ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Entry:
    """One cpio member: ``data`` is a file's content or a symlink's target."""

    name: str
    mode: int
    data: bytes | Path = b""
    rdev: tuple[int, int] = (0, 0)


def _entries(root: Path, files: set[str], modules: list[Path]) -> Iterator[_Entry]:
    """Every member of the initramfs, each directory before what it holds."""
    members: dict[str, _Entry] = {}
    for rel in sorted(files):
        path = root / rel
        if path.is_symlink():
            members[rel] = _Entry(rel, stat.S_IFLNK | 0o777, os.readlink(path).encode())
        else:
            members[rel] = _Entry(rel, stat.S_IFREG | (path.stat().st_mode & 0o777), path)
    init = _GUEST_DIR / "init"
    members["init"] = _Entry("init", stat.S_IFREG | 0o755, init)
    for applet in APPLETS:
        members[f"bin/{applet}"] = _Entry(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
    for ko in modules:
        name = f"lib/modules/{ko.stem.replace('-', '_')}.ko"
        members[name] = _Entry(name, stat.S_IFREG | 0o644, ko)
    order = "".join(f"{ko.stem.replace('-', '_')}\n" for ko in modules).encode()
    members["lib/modules/load-order"] = _Entry(
        "lib/modules/load-order", stat.S_IFREG | 0o644, order
    )
    members["dev/console"] = _Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    members["dev/null"] = _Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3))
    directories = {"proc", "sys", "dev", "run", "tmp", "root"}
    for name in members:
        parts = name.split("/")[:-1]
        directories |= {"/".join(parts[: i + 1]) for i in range(len(parts))}
    for name in sorted(directories):
        yield _Entry(name, stat.S_IFDIR | (0o1777 if name == "tmp" else 0o755))
    yield from (members[name] for name in sorted(members))


def _write_cpio(path: Path, entries: Iterable[_Entry]) -> None:
    """An uncompressed newc archive of ``entries`` (mtime 0, owner root)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        inode = 0
        for inode, entry in enumerate(entries, start=1):
            data = entry.data.read_bytes() if isinstance(entry.data, Path) else entry.data
            _cpio_member(out, inode, entry.name, entry.mode, data, entry.rdev)
        _cpio_member(out, inode + 1, "TRAILER!!!", 0, b"", (0, 0))
    tmp.rename(path)


def _cpio_member(
    out: IO[bytes], inode: int, name: str, mode: int, data: bytes, rdev: tuple[int, int]
) -> None:
    encoded = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    fields = (inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    out.write(b"070701" + b"".join(b"%08X" % value for value in fields))
    out.write(encoded + b"\0" * (-(110 + len(encoded)) % 4))
    out.write(data + b"\0" * (-len(data) % 4))


# The accelerator canary ------------------------------------------------------------

_accel: str | None = None
_accel_lock = threading.Lock()
CANARY_TIMEOUT = 30.0
"""Seconds a canary boot under KVM may take before KVM counts as not working."""


def detect_accel(image: GuestImage | None = None) -> str:
    """``"kvm"`` when a tiny boot under KVM works here, else ``"tcg"``; asked once
    per process. ``/dev/kvm`` may exist and still fail a stock kernel, so the
    answer comes from booting the guest's kernel (``sr.canary=1``: its init
    prints ``sr-canary: ok`` and powers off) with ``accel=kvm``."""
    global _accel
    with _accel_lock:
        if _accel is None:
            _accel = "kvm" if _kvm_boots(image) else "tcg"
        return _accel


def _kvm_boots(image: GuestImage | None) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which("qemu-system-x86_64") is None:
        return False  # Fast path.
    image = image or build_guest()
    argv = [
        "qemu-system-x86_64", "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "128",
        "-nographic", "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", "console=ttyS0 quiet panic=-1 sr.canary=1",
    ]  # fmt: skip
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=CANARY_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and b"sr-canary: ok" in done.stdout


# Helpers ---------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (blocking)."""
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tool(
    argv: list[str],
    *,
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdin: str = "",
) -> str:
    """Run a build tool; its failure (or absence) is a GuestError naming ``what``."""
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=env, input=stdin.encode(), capture_output=True,
            timeout=_TOOL_TIMEOUT,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestError(detail=f"cannot {what}: {e}") from e
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-2000:]
        hint = " (try `apt-get update`)" if argv[0].startswith("apt") else ""
        raise GuestError(detail=f"cannot {what}{hint}: {argv[0]} exited {done.returncode}: {tail}")
    return done.stdout.decode(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or find) the guest and print its paths as JSON."""
    parser = argparse.ArgumentParser(prog="python -m siterecovery.providers.libvirt.guest_image")
    parser.add_argument("--cache", type=Path, default=None, help="cache directory")
    args = parser.parse_args(argv)
    try:
        image = build_guest(args.cache)
    except GuestError as e:
        print(f"guest_image: {e}", file=sys.stderr)
        return 1
    print(json.dumps(image.to_dict(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
