"""The lane's kernel: Debian's stock 6.1 kernel package, fetched with apt once
and cached under $MICROVM_CACHE/lane (default ~/.cache/microvm/lane)."""

from __future__ import annotations

import lzma
import os
import re
import shlex
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from microvm.errors import LaneError

KERNEL_META = "linux-image-amd64"
KERNEL_RE = re.compile(r"linux-image-(6\.1\.0-(\d+)-amd64)(?:-unsigned)?$")


@dataclass(frozen=True)
class LaneKernel:
    release: str  # e.g. "6.1.0-50-amd64"
    root: Path  # the package extracted by dpkg-deb -x

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def cache_dir() -> Path:
    base = os.environ.get("MICROVM_CACHE") or Path.home() / ".cache" / "microvm"
    return Path(base) / "lane"


def _run(argv: Sequence[str], cwd: str | None = None) -> str:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd).stdout
    except FileNotFoundError as e:
        raise LaneError(f"{argv[0]} not found") from e
    except subprocess.CalledProcessError as e:
        raise LaneError(f"{shlex.join(argv)} failed: {e.stderr.strip()}") from e


def _release_key(release: str) -> int:
    m = KERNEL_RE.match(f"linux-image-{release}")
    return int(m.group(2)) if m else -1


def cached_kernel(root: Path) -> LaneKernel | None:
    """The newest kernel already extracted under root: reruns never consult apt."""
    found = [LaneKernel(d.name, d) for d in root.glob("6.1.0-*-amd64") if _release_key(d.name) >= 0]
    found = [k for k in found if k.vmlinuz.is_file()]
    return max(found, key=lambda k: _release_key(k.release), default=None)


def _wanted_packages() -> list[str]:
    """Package names to try, best first: what linux-image-amd64 depends on, else the newest ABI."""
    names = [n for n in re.findall(r"Depends: (\S+)", _run(["apt-cache", "depends", KERNEL_META]))
             if KERNEL_RE.match(n)]
    if not names:
        found = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"])
        names = sorted((line.split()[0] for line in found.splitlines()),
                       key=lambda n: _release_key(KERNEL_RE.match(n).group(1)),  # type: ignore[union-attr]
                       reverse=True)[:1]
    if not names:
        raise LaneError("no linux-image-6.1.0-*-amd64 package known to apt (apt-get update?)")
    # The signed and unsigned images carry the same modules; either boots under QEMU.
    return [n for name in names for n in (name, name + "-unsigned")]


def find_kernel() -> LaneKernel:
    """Debian's 6.1 kernel, downloaded and extracted into the cache (never into /boot)."""
    root = cache_dir()
    cached = cached_kernel(root)
    if cached:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    errors = []
    for pkg in _wanted_packages():
        release = KERNEL_RE.match(pkg).group(1)  # type: ignore[union-attr]
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            try:
                # The sandbox user _apt cannot write into root's cache dir.
                _run(["apt-get", "download", "-o", "APT::Sandbox::User=root", pkg], cwd=tmp)
                deb = next(Path(tmp).glob("*.deb"))
                _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")])
            except LaneError as e:
                errors.append(str(e))
                continue
            try:  # atomic publish; a concurrent run may have won the race
                os.rename(Path(tmp) / "x", root / release)
            except OSError:
                if not (root / release).is_dir():
                    raise
        kernel = LaneKernel(release, root / release)
        if kernel.vmlinuz.is_file():
            return kernel
    raise LaneError("cannot fetch the lane kernel:\n" + "\n".join(errors))


def extract_vmlinux(bzimage: Path, dest: Path) -> bool:
    """Unpack the ELF vmlinux inside an XZ bzImage; False if it is not one.

    Under TCG the bzImage's own XZ decompressor takes ~3 s, which is most of
    the lane's boot. The vmlinux carries a PVH entry note (CONFIG_PVH=y), so
    QEMU's -kernel loads it directly. Layout: Documentation/x86/boot.rst
    (setup_sects at 0x1f1, payload_offset/payload_length at 0x248).
    """
    data = bzimage.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        return False
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start:start + length]
    if not payload.startswith(b"\xfd7zXZ\0"):
        return False
    # The build appends the decompressed size after the stream; the
    # decompressor stops at the end of the stream and leaves it unused.
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if not elf.startswith(b"\x7fELF"):
        return False
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, dest)
    return True


def boot_image(kernel: LaneKernel) -> Path:
    """The file to give QEMU's -kernel: the cached vmlinux when possible."""
    vmlinux = kernel.root / "boot" / f"vmlinux-{kernel.release}"
    if vmlinux.is_file() or extract_vmlinux(kernel.vmlinuz, vmlinux):
        return vmlinux
    return kernel.vmlinuz
