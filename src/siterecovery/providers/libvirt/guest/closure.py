"""Build-time helper, run by the guest's own python3.11 on the build host (never
inside the guest): which files the guest needs, and their bytecode.

    python3.11 -S -B -P closure.py probe DIR  # prints JSON {"modules": [...], "libraries": [...]}
    python3.11 -S -B -P closure.py compile   # stdin: "SOURCE<TAB>SHOWN" lines

``probe`` imports the guest agent and the workload and runs the journal
(format, append, quiesce, check, on a sparse file in the empty directory
DIR) so that lazy imports happen too, then prints the file of every loaded
module and every mapped shared library. It imports nothing the guest does not
(no ``tempfile``). Three optional extensions are kept out on purpose
(:data:`LEFT_OUT`): without OpenSSL's ``_hashlib``, ``hashlib`` falls back to
its built-in blake2 (the only hash the journal uses), and ``shutil`` (which
argparse imports) does without ``bz2`` and ``lzma``; the guest then needs
neither libcrypto (4.5 MB) nor libbz2 and liblzma.

``compile`` writes an unchecked-hash ``.pyc`` next to each SOURCE (in
``__pycache__``), naming SHOWN (the path in the guest) in tracebacks: the
guest never stats a source to validate its bytecode.
"""

from __future__ import annotations

import json
import os
import py_compile
import sys
from pathlib import Path
from typing import Any

LEFT_OUT = ("_hashlib", "_bz2", "_lzma")
"""Extension modules the guest does without (their importers fall back)."""

_DISK = 2 * 1024 * 1024
_JOURNAL = 64 * 1024


class _Control:
    """A stand-in for the workload's control socket."""

    def quiesce(self, timeout: float = 1.0) -> int:
        return 0

    def thaw(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"seq": 0, "paused": False}


def _exercise(directory: Path) -> None:
    from siterecovery.disk.file import FileDevice, create_raw
    from siterecovery.providers.libvirt.guest import agent
    from siterecovery.providers.local import journal, workload

    path = directory / "disk.raw"
    create_raw(path, _DISK)
    with FileDevice.open(path, writable=True) as device:
        journal.format_disks([device], seed=1, journal_size=_JOURNAL)
        running = workload.Workload(journal.JournalWriter.open([device]), rate=0)
        running.quiesce(1.0)
        running.thaw()
        journal.JournalWriter.open([device]).append()
        if not journal.check([device]).consistent:
            raise SystemExit("closure: the journal exercise is not consistent")
    workload.parse_args(["--device", str(path), "--control", "c", "--state", "s"])
    agent.parse_cmdline("sr.rate=5 sr.seed=3")
    responder = agent.Responder(_Control(), freeze_timeout=1.0, on_shutdown=lambda mode: None)
    for name in ("guest-info", "guest-fsfreeze-freeze", "nonesuch"):
        responder.reply(json.dumps({"execute": name}).encode())


def probe(directory: Path) -> dict[str, list[str]]:
    """The files of the loaded modules and the mapped libraries, after the exercise."""
    for name in LEFT_OUT:
        sys.modules[name] = None  # type: ignore[assignment]
    _exercise(directory)
    files = (getattr(module, "__file__", None) for module in list(sys.modules.values()))
    modules = {os.path.abspath(path) for path in files if path}
    with open("/proc/self/maps") as maps:
        mapped = {line.split(maxsplit=5)[-1].strip() for line in maps}
    libraries = {path for path in mapped if path.startswith("/") and ".so" in path}
    return {"modules": sorted(modules), "libraries": sorted(libraries)}


def compile_all(lines: list[str]) -> None:
    """Byte-compile each ``SOURCE<TAB>SHOWN`` line; raises on a syntax error."""
    for line in lines:
        source, shown = line.rstrip("\n").split("\t")
        py_compile.compile(
            source,
            dfile=shown,
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "probe":
        print(json.dumps(probe(Path(argv[1]))))
        return 0
    if argv == ["compile"]:
        compile_all([line for line in sys.stdin if line.strip()])
        return 0
    print("usage: closure.py probe DIR | compile", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
