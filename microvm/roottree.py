"""A directory laid out as a guest's root filesystem, filled from the host.

Host files go to the same absolute paths they have on the host, and so do the
symlinks on the way: on a usrmerged host /lib is a link to usr/lib, so the
guest gets that link and the library under /usr/lib, and a path that works on
the host (an RPATH, the dynamic loader's own path, a venv's `home`) works in
the guest unchanged.

The tree's symlinks keep their host targets, which may be absolute: they are
meant for the guest's root, so nothing here ever follows a link inside the
tree (that could write to the host). Links are resolved by walking the host
path, whose layout the tree copies.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from microvm.images import ImageError
from microvm.initramfs import CpioError, busybox_applets, busybox_path

_MAX_LINKS = 40  # as the kernel's MAXSYMLINKS (fs/namei.c)
_LDD_BATCH = 64
_ELF_MAGIC = b"\x7fELF"


class RootTree:
    """A staging directory for mkfs.ext4 -d (microvm.images.build_ext4)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.elf_files: list[str] = []  # host paths of the ELF files copied so far

    def _dest(self, path: PurePosixPath) -> Path:
        return self.root / str(path).lstrip("/")

    def mirror(self, path: str, *, make_dirs: bool = False) -> PurePosixPath:
        """Copy the host's path (a file, or a directory without its contents) into
        the tree with every symlink on the way; returns it with the links resolved.

        make_dirs: create what the host does not have as plain directories.
        """
        return self._mirror(PurePosixPath(path), make_dirs, 0)

    def _mirror(self, path: PurePosixPath, make_dirs: bool, links: int) -> PurePosixPath:
        if links > _MAX_LINKS:
            raise ImageError(f"too many levels of symlinks at {path}")
        cur = PurePosixPath("/")  # resolved so far: a real directory in host and tree alike
        parts = path.parts[1:]
        for i, name in enumerate(parts):
            if name == ".":
                continue
            if name == "..":
                cur = cur.parent
                continue
            cur /= name
            dest = self._dest(cur)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if not make_dirs:
                    raise ImageError(f"{path}: {cur} does not exist on this host") from None
                _make_dir(dest, 0o755)
                continue
            except OSError as e:
                raise ImageError(f"cannot read {cur}: {e.strerror or e}") from e
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(cur)
                if not os.path.lexists(dest):
                    os.symlink(target, dest)
                # A relative target starts from the link's directory, which is resolved.
                base = cur.parent / target  # an absolute target replaces the base
                return self._mirror(base.joinpath(*parts[i + 1:]), make_dirs, links + 1)
            if stat.S_ISDIR(st.st_mode):
                _make_dir(dest, stat.S_IMODE(st.st_mode))
            elif i < len(parts) - 1:
                raise ImageError(f"{path}: {cur} is not a directory")
            elif stat.S_ISREG(st.st_mode):
                self._copy_file(str(cur), str(dest))
            else:
                raise ImageError(f"{cur} is not a regular file, directory or symlink")
        return cur

    def copy_tree(self, path: str, skip: Callable[[str], bool] = lambda p: False) -> PurePosixPath:
        """Copy a host directory and everything below it, but for the host paths skip() names."""
        real = self.mirror(path)

        def ignore(directory: str, names: list[str]) -> set[str]:
            return {n for n in names if skip(os.path.join(directory, n))}

        try:
            shutil.copytree(real, self._dest(real), symlinks=True, ignore=ignore, dirs_exist_ok=True,
                            copy_function=self._copy_file)
        except (OSError, shutil.Error) as e:
            raise ImageError(f"cannot copy {real} into the image: {e}") from e
        return real

    def _copy_file(self, src: str, dst: str) -> str:
        if os.path.lexists(dst):
            return dst
        shutil.copy2(src, dst)
        if _is_elf(src):
            self.elf_files.append(src)
        return dst

    def add_shared_libraries(self, elf_files: Iterable[str] | None = None) -> list[str]:
        """Mirror every shared library the ELF files need, the dynamic loader included.

        By default for every ELF file copied so far. `ldd` resolves them as the
        loader will in the guest (RUNPATH, $ORIGIN, ld.so.cache, the default
        directories), from an environment without LD_LIBRARY_PATH, which the
        guest does not have either. Returns "lib (needed by file)" for each
        library not found on this host: code that needs it fails here as well.
        """
        files = sorted(set(self.elf_files if elf_files is None else elf_files))
        batches = [files[i:i + _LDD_BATCH] for i in range(0, len(files), _LDD_BATCH)]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(_ldd, batches))
        # A wheel's bundled library (scipy.libs/libquadmath-*.so) is found through
        # the RPATH of the module that loads it, not of the library asking: copied is found.
        copied = {os.path.basename(f) for f in self.elf_files}
        missing: set[str] = set()
        libraries: set[str] = set()
        for found, not_found in results:
            libraries |= found
            missing |= {f"{lib} (needed by {by})" for lib, by in not_found if lib not in copied}
        for lib in sorted(libraries):
            self.mirror(lib)
        return sorted(missing)

    def add_busybox(self, must_have: Iterable[str] = ()) -> Path:
        """busybox-static as /bin/busybox, and in /bin a link for each applet not already there."""
        try:
            busybox = busybox_path()
            applets = {PurePosixPath(p).name for p in busybox_applets(busybox)} - {"busybox"}
        except CpioError as e:
            raise ImageError(str(e)) from e
        absent = sorted(set(must_have) - applets)
        if absent:
            raise ImageError(f"busybox at {busybox} has no applet(s): {', '.join(absent)}")
        bindir = self._dest(self.mirror("/bin", make_dirs=True))
        if os.path.lexists(bindir / "busybox"):
            raise ImageError("/bin/busybox is already in the image")
        shutil.copy2(busybox, bindir / "busybox")
        for name in sorted(applets):
            if not os.path.lexists(bindir / name):
                os.symlink("busybox", bindir / name)
        return bindir

    def write_file(self, directory: str, name: str, data: bytes, mode: int = 0o644) -> None:
        """A file of ours (not the host's) in a directory mirrored from the host."""
        dest = self._dest(self.mirror(directory, make_dirs=True)) / name
        if os.path.lexists(dest):
            raise ImageError(f"{directory}/{name} is already in the image")
        dest.write_bytes(data)
        dest.chmod(mode)

    def symlink(self, directory: str, name: str, target: str, *, keep_existing: bool = False) -> None:
        """A link of ours; keep_existing: unless the host's path is already there (it wins)."""
        dest = self._dest(self.mirror(directory, make_dirs=True)) / name
        if os.path.lexists(dest):
            if keep_existing:
                return
            raise ImageError(f"{directory}/{name} is already in the image")
        os.symlink(target, dest)


def _make_dir(dest: Path, mode: int) -> None:
    try:
        dest.mkdir()
    except FileExistsError:
        if not stat.S_ISDIR(os.lstat(dest).st_mode):
            raise ImageError(f"{dest} is in the image already, and not as a directory") from None
        return
    dest.chmod(mode)


def _is_elf(path: str) -> bool:
    # Shared objects ("x.so", "libx.so.1") and executables; everything else is data.
    name = os.path.basename(path)
    if ".so" not in name and not os.stat(path).st_mode & 0o111:
        return False
    with open(path, "rb") as f:
        return f.read(4) == _ELF_MAGIC


def _ldd(files: list[str]) -> tuple[set[str], set[tuple[str, str]]]:
    """(library paths, (library, needed by) not found) for a batch of ELF files."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise ImageError("ldd not found: it comes with glibc (apt-get install libc-bin)")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    env["LC_ALL"] = "C"
    # ldd exits 1 when one of the files is not dynamic (a static helper): the
    # output is still complete.
    proc = subprocess.run([ldd, *files], capture_output=True, text=True, env=env)
    found: set[str] = set()
    missing: set[tuple[str, str]] = set()
    current = files[0]
    for line in proc.stdout.splitlines():
        if not line.startswith(("\t", " ")):
            current = line.rstrip(":")  # "file:" heads each file's list when there are several
            continue
        name, arrow, rest = line.strip().partition(" => ")
        if arrow and rest.startswith("not found"):
            missing.add((name, current))
        elif (arrow and rest.startswith("/")) or name.startswith("/"):
            found.add((rest if arrow else name).rsplit(" (", 1)[0])
    return found, missing
