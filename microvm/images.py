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


def build_ext4(source: str | Path, dest: str | Path, size_mib: int | None = None, label: str = "microvm") -> Path:
    """Make a raw ext4 image at dest holding a copy of the directory source."""
    src, out = Path(source), Path(dest)
    if not src.is_dir():
        raise ConfigError(f"image source {src} is not a directory")
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mke2fs")
    if mkfs is None:
        raise ImageError("mkfs.ext4 not found: apt-get install e2fsprogs")
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
