"""Damaged kernels: whatever the bytes, the loader answers with a LoaderError or a BootInfo.

It must also never touch the caller's low memory (GDT, page tables), whether it
succeeds or fails; GuestMemory already keeps it inside guest RAM.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm.errors import LoaderError
from microvm.loader import BootInfo, load_linux
from tests.unit.test_loader_images import FILL, RAM, RESERVED, guest_memory, make_bzimage, make_elf

ELF = make_elf()
ELF_SECTION_NOTE = make_elf(note="section")
BZIMAGE = make_bzimage()
CALLERS = [(0x500, 0x100), (0x9000, 0x7000)]  # GDT, page tables

fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def try_load(kernel: bytes) -> None:
    mem = guest_memory()
    try:
        info = load_linux(mem, kernel, cmdline="console=ttyS0", initrd=b"\x07" * 3000, ram=RAM,
                          reserved=RESERVED)
    except LoaderError:
        pass
    else:
        assert isinstance(info, BootInfo)
    for addr, size in CALLERS:
        assert mem.read(addr, size) == bytes([FILL]) * size


@st.composite
def damaged(draw: st.DrawFn, image: bytes, hot: int) -> bytes:
    """`image` with a few bytes overwritten (mostly in the first `hot` header bytes), maybe cut short."""
    data = bytearray(image)
    for _ in range(draw(st.integers(1, 8))):
        limit = hot if draw(st.booleans()) else len(data)
        data[draw(st.integers(0, limit - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@fuzz
@given(st.integers(0, len(ELF)))
def test_truncated_elf(cut: int) -> None:
    try_load(ELF[:cut])


@fuzz
@given(damaged(ELF, 0x100))
def test_damaged_elf(kernel: bytes) -> None:
    try_load(kernel)


@fuzz
@given(damaged(ELF_SECTION_NOTE, 0x100))
def test_damaged_elf_with_section_headers(kernel: bytes) -> None:
    try_load(kernel)


@fuzz
@given(st.integers(0, len(BZIMAGE)))
def test_truncated_bzimage(cut: int) -> None:
    try_load(BZIMAGE[:cut])


@fuzz
@given(damaged(BZIMAGE, 0x290))
def test_damaged_bzimage(kernel: bytes) -> None:
    try_load(kernel)
