"""What crosses into the VM of a test marked microvm: the rootdir's tree, as a tar.

The guest runs the test from a copy of the rootdir (pytest's rootdir: where
pytest.ini, pyproject.toml or setup.cfg was found), so its conftest.py files,
ini file, data files and imports resolve as they do on the host. Left out:

- directories named in EXCLUDED_DIRS (version control, caches, virtual
  environments by their usual names) and any directory holding a pyvenv.cfg
  (a virtual environment by any name): the guest has its own Python;
- whatever matches a pattern of the ini option microvm_exclude (fnmatch
  against the rootdir-relative path, and against the name alone);
- symbolic links to directories, dangling links, and anything not a regular
  file (sockets, fifos, devices); a link to a file crosses as that file.
  Files cross with their mode and mtime; directories only as their files' parents.

Past the size limit (ini microvm_max_upload_mib, 64 MiB by default) nothing
crosses and the test fails with the largest entries named. The tree is read
once per session, at the first marked test.
"""

from __future__ import annotations

import fnmatch
import io
import os
import stat
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

EXCLUDED_DIRS = frozenset({
    ".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".tox", ".nox", ".eggs",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis", "node_modules",
})
ROOT = "root"  # in the tar: the rootdir's files under root/, the guest plugin under lib/
LIB = "lib"


class CrossingError(Exception):
    """The rootdir cannot be shipped into the VM (too big, unreadable)."""


@dataclass(frozen=True)
class Entry:
    relpath: str  # rootdir-relative, with "/"
    source: Path  # what is read (a link's target for a link to a file)
    size: int


def select(root: Path, exclude: Sequence[str] = (), limit: int | None = None) -> list[Entry]:
    """The files of root that cross, sorted by path; CrossingError past limit bytes."""
    entries: list[Entry] = []

    def excluded(rel: str, name: str) -> bool:
        return any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(name, p) for p in exclude)

    def fail(e: OSError) -> None:
        raise CrossingError(f"cannot read {e.filename}: {e.strerror or e}")

    for top, dirs, files in os.walk(root, onerror=fail):
        rel_top = os.path.relpath(top, root)
        prefix = "" if rel_top == "." else rel_top.replace(os.sep, "/") + "/"
        dirs[:] = sorted(d for d in dirs
                         if d not in EXCLUDED_DIRS and not excluded(prefix + d, d)
                         and not os.path.islink(os.path.join(top, d))
                         and not os.path.exists(os.path.join(top, d, "pyvenv.cfg")))
        for name in sorted(files):
            rel = prefix + name
            if excluded(rel, name):
                continue
            path = Path(top, name)
            try:
                st = path.stat()  # follows a link: a link to a file crosses as the file
            except FileNotFoundError:
                continue  # a dangling link, or gone since the walk listed it
            except OSError as e:
                fail(e)
            if stat.S_ISREG(st.st_mode):
                entries.append(Entry(rel, path, st.st_size))
    entries.sort(key=lambda e: e.relpath)
    total = sum(e.size for e in entries)
    if limit is not None and total > limit:
        raise CrossingError(too_big(root, entries, total, limit))
    return entries


def too_big(root: Path, entries: Sequence[Entry], total: int, limit: int) -> str:
    by_top: dict[str, int] = {}
    for e in entries:
        top, _, rest = e.relpath.partition("/")
        key = f"{top}/" if rest else top
        by_top[key] = by_top.get(key, 0) + e.size
    largest = sorted(by_top.items(), key=lambda kv: -kv[1])[:5]
    return (f"the rootdir {root} holds {_mib(total)} of files to ship into the VM, over the limit of "
            f"{_mib(limit)} (ini option microvm_max_upload_mib); the largest: "
            + ", ".join(f"{name} ({_mib(size)})" for name, size in largest)
            + ". Leave some out with the ini option microvm_exclude (glob patterns), or raise the limit.")


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def pack(entries: Sequence[Entry], extra: dict[str, bytes]) -> bytes:
    """A tar of the entries under root/ and extra (name -> bytes) under lib/."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            try:
                st = e.source.stat()
                info = tarfile.TarInfo(f"{ROOT}/{e.relpath}")
                info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), stat.S_IMODE(st.st_mode)
                with open(e.source, "rb") as f:
                    tar.addfile(info, f)
            except OSError as err:
                raise CrossingError(f"cannot read {e.source}: {err.strerror or err}") from err
        for name, data in sorted(extra.items()):
            info = tarfile.TarInfo(f"{LIB}/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
