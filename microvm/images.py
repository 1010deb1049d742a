"""Disk images: ext4 filesystems built from a directory (mkfs.ext4 -d)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from microvm.errors import ConfigError, MicroVMError

MIB = 1 << 20


class ImageError(MicroVMError):
    """An image could not be built."""


def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def mkfs_ext4() -> str:
    """The host's mkfs.ext4 (or mke2fs), or ImageError."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mke2fs")
    if mkfs is None:
        raise ImageError("mkfs.ext4 not found: apt-get install e2fsprogs")
    return mkfs


def build_ext4(source: str | Path, dest: str | Path, size_mib: int | None = None, label: str = "microvm") -> Path:
    """Make a raw ext4 image at dest holding a copy of the directory source."""
    src, out = Path(source), Path(dest)
    if not src.is_dir():
        raise ConfigError(f"image source {src} is not a directory")
    mkfs = mkfs_ext4()
    if size_mib is None:
        # Room for the files, metadata and some free space: 1.5x + 16 MiB.
        size_mib = max(16, (dir_size(src) * 3 // 2) // MIB + 16)
    if size_mib <= 0:
        raise ConfigError(f"image size must be positive, got {size_mib} MiB")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.truncate(size_mib * MIB)  # sparse; a multiple of 512 by construction
        proc = subprocess.run([mkfs, "-q", "-F", "-t", "ext4", "-L", label, "-d", str(src), str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ImageError(f"mkfs.ext4 failed for {src}: {proc.stderr.strip().splitlines()[-1:]}")
        tmp.replace(out)
    except OSError as e:
        raise ImageError(f"cannot write image {out}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return out


DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3",)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE_SCRIPT_VERSION = 1


def image_cache_dir() -> Path:
    """$MICROVM_CACHE/images, or ~/.cache/microvm/images."""
    return Path(os.environ.get("MICROVM_CACHE") or Path.home() / ".cache" / "microvm") / "images"


def apt_mirror() -> str:
    """The Debian mirror this host's apt uses (deb822 or one-line sources)."""
    for path in [*sorted(Path("/etc/apt/sources.list.d").glob("*.sources")), Path("/etc/apt/sources.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1 and words[1].rstrip("/").endswith("/debian"):
                return words[1]
            if words[:1] == ["deb"] and len(words) > 2 and words[1].rstrip("/").endswith("/debian"):
                return words[1]
    return DEFAULT_MIRROR


def debian_image_path(packages: tuple[str, ...] = DEBIAN_PACKAGES, suite: str = DEBIAN_SUITE) -> Path:
    import hashlib

    key = hashlib.sha256(f"{IMAGE_SCRIPT_VERSION}:{suite}:{','.join(sorted(packages))}".encode()).hexdigest()[:12]
    return image_cache_dir() / f"debian-{suite}-{key}.ext4"


def build_debian_image(packages: tuple[str, ...] = DEBIAN_PACKAGES, suite: str = DEBIAN_SUITE,
                       mirror: str | None = None, force: bool = False) -> Path:
    """A Debian root filesystem (debootstrap minbase + packages) as a cached ext4 image."""
    import tempfile

    dest = debian_image_path(packages, suite)
    if dest.exists() and not force:
        return dest
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None:
        raise ImageError("debootstrap not found: apt-get install debootstrap")
    if os.geteuid() != 0:
        raise ImageError("building a Debian root image needs root (debootstrap)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        root = Path(tmp, "root")
        argv = [debootstrap, "--variant=minbase", f"--include={','.join(packages)}", suite, str(root),
                mirror or apt_mirror()]
        log = Path(tmp, "debootstrap.log")
        with open(log, "w") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise ImageError(f"debootstrap failed ({proc.returncode}): {' | '.join(tail)}")
        # Leave apt's downloads out of the image.
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
        build_ext4(root, dest)
    return dest
