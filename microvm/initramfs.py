"""Deterministic cpio "newc" archives, the format Linux unpacks as an initramfs.

The format is described in the kernel's
Documentation/driver-api/early-userspace/buffer-format.rst: every entry is a
110-byte ASCII header (magic "070701" and thirteen 8-digit hex fields), the
NUL-terminated name padded so that header + name is a multiple of 4, then the
data padded to a multiple of 4. The archive ends with an entry named
"TRAILER!!!".

Archives are reproducible: mtime, uid and gid are 0, inode numbers are given
in insertion order, and gzip output carries no timestamp. The same calls in the
same order always give the same bytes, so callers can key caches on them.
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

NEWC_MAGIC = b"070701"
NEWC_HEADER_SIZE = 110
TRAILER_NAME = "TRAILER!!!"

# Where Debian's busybox-static puts its binary (usrmerge makes both the same
# file). The dynamically linked `busybox` package installs /bin/busybox too,
# which is why busybox_path() checks for static linking.
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))


class CpioError(Exception):
    """A host-side failure while collecting files for an archive."""


@dataclass(frozen=True)
class _Entry:
    mode: int  # file type bits | permission bits, as in st_mode
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _normalise(path: str) -> str:
    """Archive names are relative ("bin/sh"); the kernel unpacks them under /."""
    parts = PurePosixPath("/" + path).parts[1:]
    if not parts or any(p in (".", "..") for p in parts):
        raise ValueError(f"invalid archive path {path!r}")
    return "/".join(parts)


class Cpio:
    """An in-memory cpio newc archive built entry by entry.

    Entries are written in insertion order; missing parent directories are
    added (mode 0755) just before the first entry that needs them, so the
    kernel always sees a directory before its contents. An implicit directory
    may later be given explicitly with add_dir() to set its mode; any other
    repeated path raises ValueError.
    """

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._implicit: set[str] = set()

    def __contains__(self, path: str) -> bool:
        return _normalise(path) in self._entries

    def paths(self) -> list[str]:
        """Archive names in the order they will be written."""
        return list(self._entries)

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = _normalise(path)
        if name in self._implicit:
            # Keeps its position (before its children); only the mode changes.
            self._implicit.discard(name)
            self._entries[name] = _Entry(stat.S_IFDIR | stat.S_IMODE(mode))
            return
        self._add(name, _Entry(stat.S_IFDIR | stat.S_IMODE(mode)))

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(_normalise(path), _Entry(stat.S_IFREG | stat.S_IMODE(mode), bytes(data)))

    def add_file_from(self, path: str, host_path: str | os.PathLike[str], mode: int | None = None) -> None:
        """Copy a host file's contents; mode defaults to the host file's permissions."""
        try:
            st = os.stat(host_path)
            data = Path(host_path).read_bytes()
        except OSError as e:
            raise CpioError(f"cannot read {host_path} for {path}: {e}") from e
        self.add_file(path, data, stat.S_IMODE(st.st_mode) if mode is None else mode)

    def add_symlink(self, path: str, target: str) -> None:
        # A symlink's data is its target, without a terminating NUL.
        self._add(_normalise(path), _Entry(stat.S_IFLNK | 0o777, os.fsencode(target)))

    def add_char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(_normalise(path), _Entry(stat.S_IFCHR | stat.S_IMODE(mode), b"", major, minor))

    def add_block_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._add(_normalise(path), _Entry(stat.S_IFBLK | stat.S_IMODE(mode), b"", major, minor))

    def _add(self, name: str, entry: _Entry) -> None:
        if name in self._entries:
            raise ValueError(f"duplicate path in cpio archive: /{name}")
        # parents of "a/b/c" are "a/b", "a", "."; create them outermost first.
        for ancestor in reversed(PurePosixPath(name).parents[:-1]):
            self._add_implicit_dir(str(ancestor))
        self._entries[name] = entry

    def _add_implicit_dir(self, name: str) -> None:
        existing = self._entries.get(name)
        if existing is None:
            self._entries[name] = _Entry(stat.S_IFDIR | 0o755)
            self._implicit.add(name)
        elif not stat.S_ISDIR(existing.mode):
            raise ValueError(f"/{name} is not a directory in the cpio archive")

    def to_bytes(self, compress: bool = False) -> bytes:
        out = bytearray()
        for ino, (name, entry) in enumerate(self._entries.items(), start=1):
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            _write_entry(out, name, entry, ino, nlink)
        _write_entry(out, TRAILER_NAME, _Entry(0), 0, 1)
        if not compress:
            return bytes(out)
        # mtime=0 keeps the gzip header reproducible.
        return gzip.compress(bytes(out), compresslevel=9, mtime=0)

    def write(self, dest: str | os.PathLike[str], compress: bool = False) -> None:
        Path(dest).write_bytes(self.to_bytes(compress))


def _write_entry(out: bytearray, name: str, entry: _Entry, ino: int, nlink: int) -> None:
    name_bytes = os.fsencode(name) + b"\0"
    fields = (
        ino, entry.mode, 0, 0, nlink, 0,  # ino, mode, uid, gid, nlink, mtime
        len(entry.data), 0, 0,  # filesize, devmajor, devminor (of the archive's fs)
        entry.rdev_major, entry.rdev_minor,
        len(name_bytes), 0,  # namesize (with NUL), check (unused by newc)
    )
    out += NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    out += name_bytes
    out += b"\0" * (_align4(len(out)) - len(out))
    out += entry.data
    out += b"\0" * (_align4(len(out)) - len(out))


# --- busybox -----------------------------------------------------------------

_PT_INTERP = 3


def is_static_elf(path: Path) -> bool:
    """True for an ELF64 executable without a PT_INTERP (dynamic loader) header."""
    with path.open("rb") as f:
        ehdr = f.read(64)
        if len(ehdr) < 64 or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2:  # ELFCLASS64
            return False
        endian = "<" if ehdr[5] == 1 else ">"
        phoff, = struct.unpack_from(endian + "Q", ehdr, 0x20)
        phentsize, phnum = struct.unpack_from(endian + "HH", ehdr, 0x36)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            p_type, = struct.unpack(endian + "I", f.read(4))
            if p_type == _PT_INTERP:
                return False
    return True


def busybox_path() -> Path:
    """The host's statically linked busybox (an initramfs has no shared libraries)."""
    found = [p for p in BUSYBOX_CANDIDATES if p.is_file()]
    which = shutil.which("busybox")
    if which:
        found.append(Path(which))
    for p in found:
        if is_static_elf(p):
            return p
    what = f"{found[0]} is dynamically linked" if found else "no busybox found"
    raise CpioError(f"{what}: a static busybox is needed, run `apt-get install busybox-static`")


def busybox_applets(busybox: Path) -> list[str]:
    """Applet install paths ("bin/sh", "sbin/insmod", ...) from `busybox --list-full`."""
    try:
        out = subprocess.run([str(busybox), "--list-full"], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise CpioError(f"cannot list busybox applets: {e}") from e
    return [line.strip() for line in out.splitlines() if line.strip()]


def add_busybox(cpio: Cpio, applets: Iterable[str] | None = None, busybox: Path | None = None) -> None:
    """Install /bin/busybox and a symlink per applet (all of them by default).

    Applets go to the paths busybox itself reports (/bin/sh, /sbin/insmod, ...).
    Paths already in the archive are left alone, so files added before this
    call override an applet.
    """
    busybox = busybox or busybox_path()
    if "bin/busybox" not in cpio:
        cpio.add_file_from("/bin/busybox", busybox, 0o755)
    available = {PurePosixPath(p).name: p for p in busybox_applets(busybox)}
    wanted = sorted(available) if applets is None else list(applets)
    missing = [a for a in wanted if a not in available]
    if missing:
        raise ValueError(f"busybox at {busybox} has no applet(s): {', '.join(missing)}")
    for name in wanted:
        path = available[name]
        if name != "busybox" and path not in cpio:
            cpio.add_symlink(path, "/bin/busybox")
