"""The loader against the project's real guest kernel, if one has been built. No KVM.

Skipped until kernels/ has built a vmlinux and bzImage into the cache
($MICROVM_CACHE or ~/.cache/microvm, kernels/<key>/).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from microvm.errors import LoaderError
from microvm.loader import START_INFO, ZERO_PAGE, load_linux
from microvm.loader.bzimage import XLF_KERNEL_64, BootParams
from microvm.loader.elf import XEN_HVM_START_MAGIC_VALUE, HvmStartInfo
from microvm.memory import GuestMemory

MEM_SIZE = 256 << 20
RAM = [(0, 0x9FC00), (0x100000, MEM_SIZE - 0x100000)]
RESERVED = [(0x9FC00, 0x400)]


def _built(name: str) -> Path:
    cache = Path(os.environ.get("MICROVM_CACHE") or Path.home() / ".cache" / "microvm")
    found = sorted(cache.glob(f"kernels/*/{name}"), key=lambda p: p.stat().st_mtime)
    if not found:
        pytest.skip(f"no {name} built yet under {cache}/kernels")
    return found[-1]


def _symbol(vmlinux: Path, name: str) -> int | None:
    """The symbol's address from nm, if binutils is here."""
    try:
        out = subprocess.run(["nm", str(vmlinux)], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[2] == name:
            return int(fields[0], 16)
    return None


def test_real_vmlinux_pvh() -> None:
    vmlinux = _built("vmlinux")
    mem = GuestMemory([(0, bytearray(MEM_SIZE))])
    info = load_linux(mem, vmlinux, cmdline="console=ttyS0", initrd=b"\x07" * 4096, ram=RAM, reserved=RESERVED)
    assert info.protocol == "pvh"
    assert info.kernel_start >= 0x100000
    assert info.kernel_start <= info.entry < info.kernel_end
    assert info.initrd is not None and info.initrd[0] >= info.kernel_end
    address = _symbol(vmlinux, "pvh_start_xen")
    if address is not None:
        # head.S: the note holds pvh_start_xen - __START_KERNEL_map (its physical address).
        assert info.entry == address - 0xFFFFFFFF80000000
    si = mem.read_obj(START_INFO, HvmStartInfo)
    assert si.magic == XEN_HVM_START_MAGIC_VALUE
    assert si.nr_modules == 1


def test_vmlinux_from_a_path_loads_the_same_as_from_bytes() -> None:
    """A path is read with preadv straight into guest memory; bytes are copied in."""
    vmlinux = _built("vmlinux")
    images = []
    for source in (vmlinux, vmlinux.read_bytes()):
        backing = bytearray(MEM_SIZE)
        info = load_linux(GuestMemory([(0, backing)]), source, cmdline="console=ttyS0", ram=RAM, reserved=RESERVED)
        images.append((info, bytes(backing)))
    assert images[0][0] == images[1][0]
    assert images[0][1] == images[1][1]


def test_real_bzimage_64bit_protocol() -> None:
    bzimage = _built("bzImage")
    mem = GuestMemory([(0, bytearray(MEM_SIZE))])
    info = load_linux(mem, bzimage, cmdline="console=ttyS0", initrd=b"\x07" * 4096, ram=RAM, reserved=RESERVED)
    assert info.protocol == "linux64"
    assert info.entry == info.kernel_start + 0x200
    params = mem.read_obj(ZERO_PAGE, BootParams)
    assert params.hdr.header == 0x53726448  # "HdrS"
    assert params.hdr.version >= 0x020C
    assert params.hdr.xloadflags & XLF_KERNEL_64
    assert params.hdr.type_of_loader == 0xFF
    assert params.e820_entries == len(RAM) + len(RESERVED)
    # The kernel's footprint (init_size from where it runs) lies inside guest RAM.
    assert info.kernel_end <= MEM_SIZE
    assert info.initrd is not None and info.initrd[0] >= info.kernel_end


def test_command_line_limit_is_read_from_the_vmlinux() -> None:
    """boot_command_line's size (what the kernel keeps; nm -S agrees), for both kernels."""
    from microvm.loader.elf import parse_file

    vmlinux = _built("vmlinux")
    size = parse_file(vmlinux).command_line_size
    out = subprocess.run(["nm", "-S", str(vmlinux)], capture_output=True, text=True, check=True).stdout
    sizes = [int(f[1], 16) for f in (line.split() for line in out.splitlines())
             if len(f) == 4 and f[3] == "boot_command_line"]
    assert sizes == [size] == [2048]
    for kernel in (vmlinux, _built("bzImage")):
        mem = GuestMemory([(0, bytearray(MEM_SIZE))])
        load_linux(mem, kernel, cmdline="x" * (size - 1), ram=RAM, reserved=RESERVED)
        with pytest.raises(LoaderError, match=f"accepts at most {size - 1}"):
            load_linux(mem, kernel, cmdline="x" * size, ram=RAM, reserved=RESERVED)


def test_the_log_buffers_pointer_is_found_in_the_vmlinux_only() -> None:
    """`prb` (printk.py reads the log through it), as nm has it; a bzImage has no symbols."""
    from microvm.loader import has_log_symbol
    from microvm.loader.elf import parse_file

    vmlinux = _built("vmlinux")
    assert parse_file(vmlinux).log_pointer == _symbol(vmlinux, "prb") is not None
    assert has_log_symbol(vmlinux) and not has_log_symbol(_built("bzImage"))
    mem = GuestMemory([(0, bytearray(MEM_SIZE))])
    info = load_linux(mem, vmlinux, cmdline="quiet", ram=RAM, reserved=RESERVED)
    assert info.log_pointer == _symbol(vmlinux, "prb")
    assert any(v <= info.log_pointer < v + size for v, _, size in info.kernel_map)
