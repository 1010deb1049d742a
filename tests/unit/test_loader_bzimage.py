"""The kernel loader with a bzImage (64-bit boot protocol). No KVM.

Zero-page fields are read back at the byte offsets Documentation/x86/boot.rst
and zero-page.rst give, independently of the loader's ctypes declarations.
"""

from __future__ import annotations

import ctypes

import pytest

from microvm.errors import LoaderError
from microvm.loader import CMDLINE, ZERO_PAGE, BootInfo, load_linux
from microvm.loader.bzimage import BootE820Entry, BootParams, SetupHeader
from microvm.memory import PAGE_SIZE, GuestMemory
from tests.unit.test_loader_images import (
    BZ_ALIGN,
    BZ_INIT_SIZE,
    BZ_PAYLOAD,
    BZ_PREF,
    FILL,
    MEM_SIZE,
    RAM,
    RESERVED,
    guest_memory,
    make_bzimage,
)

INITRD = b"initramfs" * 1000


def load(mem: GuestMemory, kernel: bytes, **kw: object) -> BootInfo:
    args: dict = {"cmdline": "console=ttyS0", "ram": RAM, "reserved": RESERVED, **kw}
    return load_linux(mem, kernel, **args)


def zp(mem: GuestMemory, offset: int, size: int) -> int:
    return mem.read_int(ZERO_PAGE + offset, size)


# ---- declarations against the documents ----

# (field, offset) from zero-page.rst's table and bootparam.h's offset comments.
BOOT_PARAMS_OFFSETS = [
    ("screen_info", 0x000), ("apm_bios_info", 0x040), ("tboot_addr", 0x058), ("ist_info", 0x060),
    ("acpi_rsdp_addr", 0x070), ("hd0_info", 0x080), ("hd1_info", 0x090), ("sys_desc_table", 0x0A0),
    ("olpc_ofw_header", 0x0B0), ("ext_ramdisk_image", 0x0C0), ("ext_ramdisk_size", 0x0C4),
    ("ext_cmd_line_ptr", 0x0C8), ("cc_blob_address", 0x13C), ("edid_info", 0x140), ("efi_info", 0x1C0),
    ("alt_mem_k", 0x1E0), ("scratch", 0x1E4), ("e820_entries", 0x1E8), ("eddbuf_entries", 0x1E9),
    ("edd_mbr_sig_buf_entries", 0x1EA), ("kbd_status", 0x1EB), ("secure_boot", 0x1EC),
    ("sentinel", 0x1EF), ("hdr", 0x1F1), ("edd_mbr_sig_buffer", 0x290), ("e820_table", 0x2D0),
    ("eddbuf", 0xD00),
]

# (field, offset in the file / boot_params) from boot.rst's setup header table.
SETUP_HEADER_OFFSETS = [
    ("setup_sects", 0x1F1), ("root_flags", 0x1F2), ("syssize", 0x1F4), ("ram_size", 0x1F8),
    ("vid_mode", 0x1FA), ("root_dev", 0x1FC), ("boot_flag", 0x1FE), ("jump", 0x200), ("header", 0x202),
    ("version", 0x206), ("realmode_swtch", 0x208), ("start_sys_seg", 0x20C), ("kernel_version", 0x20E),
    ("type_of_loader", 0x210), ("loadflags", 0x211), ("setup_move_size", 0x212), ("code32_start", 0x214),
    ("ramdisk_image", 0x218), ("ramdisk_size", 0x21C), ("bootsect_kludge", 0x220), ("heap_end_ptr", 0x224),
    ("ext_loader_ver", 0x226), ("ext_loader_type", 0x227), ("cmd_line_ptr", 0x228),
    ("initrd_addr_max", 0x22C), ("kernel_alignment", 0x230), ("relocatable_kernel", 0x234),
    ("min_alignment", 0x235), ("xloadflags", 0x236), ("cmdline_size", 0x238), ("hardware_subarch", 0x23C),
    ("hardware_subarch_data", 0x240), ("payload_offset", 0x248), ("payload_length", 0x24C),
    ("setup_data", 0x250), ("pref_address", 0x258), ("init_size", 0x260), ("handover_offset", 0x264),
    ("kernel_info_offset", 0x268),
]


@pytest.mark.parametrize("name,offset", BOOT_PARAMS_OFFSETS)
def test_boot_params_offsets(name: str, offset: int) -> None:
    assert getattr(BootParams, name).offset == offset


@pytest.mark.parametrize("name,offset", SETUP_HEADER_OFFSETS)
def test_setup_header_offsets(name: str, offset: int) -> None:
    assert BootParams.hdr.offset + getattr(SetupHeader, name).offset == offset


def test_struct_sizes() -> None:
    assert ctypes.sizeof(BootParams) == 4096  # one page
    assert ctypes.sizeof(SetupHeader) == 0x26C - 0x1F1  # the 2.15 header ends at 0x26c
    assert ctypes.sizeof(BootE820Entry) == 20  # packed
    assert BootParams.e820_table.size == 0xA00  # zero-page.rst: 2D0/A00


# ---- the happy path ----


def test_loads_at_pref_address() -> None:
    mem = guest_memory()
    info = load(mem, make_bzimage())
    assert info.protocol == "linux64"
    assert info.kernel_start == BZ_PREF
    assert info.entry == BZ_PREF + 0x200  # the 64-bit entry point
    assert mem.read(info.entry, 8) == b"ENTRY64!"
    assert mem.read(BZ_PREF, len(BZ_PAYLOAD)) == BZ_PAYLOAD
    assert info.kernel_end == BZ_PREF + BZ_INIT_SIZE  # the kernel's footprint is init_size
    assert info.params_addr == ZERO_PAGE
    assert info.cmdline_addr == CMDLINE


def test_zero_page_fields() -> None:
    mem = guest_memory()
    info = load(mem, make_bzimage(), initrd=INITRD, cmdline="console=ttyS0 panic=-1")
    assert info.initrd is not None
    assert mem.read(ZERO_PAGE + 0x202, 4) == b"HdrS"  # copied from the file
    assert zp(mem, 0x206, 2) == 0x020F
    assert zp(mem, 0x1F1, 1) == 4  # setup_sects
    assert zp(mem, 0x210, 1) == 0xFF  # type_of_loader: no assigned id
    assert zp(mem, 0x211, 1) == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert zp(mem, 0x224, 2) == 0xFE00  # heap_end_ptr
    assert zp(mem, 0x1FA, 2) == 0xFFFF  # vid_mode "normal"
    assert zp(mem, 0x214, 4) == BZ_PREF  # code32_start = where we loaded it
    assert zp(mem, 0x228, 4) == CMDLINE  # cmd_line_ptr
    assert zp(mem, 0x0C8, 4) == 0  # ext_cmd_line_ptr
    assert zp(mem, 0x218, 4) == info.initrd[0]  # ramdisk_image
    assert zp(mem, 0x21C, 4) == len(INITRD)  # ramdisk_size
    assert zp(mem, 0x0C0, 4) == zp(mem, 0x0C4, 4) == 0  # ext_ramdisk_image/size
    assert mem.read(CMDLINE, 23) == b"console=ttyS0 panic=-1\0"
    assert mem.read(info.initrd[0], len(INITRD)) == INITRD
    assert zp(mem, 0x1EF, 1) == 0  # sentinel clear: we built a clean boot_params
    assert zp(mem, 0x268, 4) == 0x12345  # kernel_info_offset: inside the header, copied
    assert mem.read(ZERO_PAGE + 0x26C, 0x24) == bytes(0x24)  # past the header: not copied


def test_e820_table() -> None:
    mem = guest_memory()
    load(mem, make_bzimage())
    assert zp(mem, 0x1E8, 1) == 4
    entries = [(zp(mem, 0x2D0 + 20 * i, 8), zp(mem, 0x2D8 + 20 * i, 8), zp(mem, 0x2E0 + 20 * i, 4))
               for i in range(5)]
    assert entries == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x400, 2),
        (0xF0000, 0x10000, 2),
        (0x100000, MEM_SIZE - 0x100000, 1),
        (0, 0, 0),
    ]


def test_header_copy_stops_where_the_jump_says() -> None:
    mem = guest_memory()
    load(mem, make_bzimage(header_len=0x66))  # header ends at 0x268: kernel_info_offset not ours
    assert zp(mem, 0x268, 4) == 0
    assert zp(mem, 0x264, 4) == 0x190  # handover_offset still copied


def test_setup_sects_zero_means_four() -> None:
    mem = guest_memory()
    info = load(mem, make_bzimage(setup_sects=0))
    assert mem.read(info.entry, 8) == b"ENTRY64!"


def test_no_pref_address_loads_at_1mib() -> None:
    mem = guest_memory()
    info = load(mem, make_bzimage(pref_address=0))
    assert info.kernel_start == 0x100000
    assert mem.read(0x100200, 8) == b"ENTRY64!"
    # It decompresses at the next kernel_alignment boundary (boot.rst init_size).
    assert info.kernel_end == BZ_ALIGN + BZ_INIT_SIZE


def test_non_relocatable_loads_at_1mib_and_runs_at_pref_address() -> None:
    mem = guest_memory()
    info = load(mem, make_bzimage(relocatable=0, pref_address=0x200000))
    assert info.kernel_start == 0x100000
    assert info.entry == 0x100200
    assert info.kernel_end == 0x200000 + BZ_INIT_SIZE


@pytest.mark.parametrize("addr_max", [0x37FFFF, 0x380000 + len(INITRD) - 1])
def test_initrd_below_initrd_addr_max(addr_max: int) -> None:
    mem = guest_memory()
    info = load(mem, make_bzimage(initrd_addr_max=addr_max), initrd=INITRD)
    assert info.initrd is not None
    addr = info.initrd[0]
    assert addr % PAGE_SIZE == 0
    assert addr + len(INITRD) - 1 <= addr_max  # initrd_addr_max is the highest byte allowed
    assert addr + PAGE_SIZE + len(INITRD) - 1 > addr_max  # and it is as high as it can go


def test_cmdline_size_from_the_header() -> None:
    load(guest_memory(), make_bzimage(cmdline_size=16), cmdline="x" * 16)
    with pytest.raises(LoaderError, match="command line is 17 bytes, the kernel accepts at most 16"):
        load(guest_memory(), make_bzimage(cmdline_size=16), cmdline="x" * 17)


def test_loader_leaves_the_callers_low_memory_alone() -> None:
    mem = guest_memory()
    load(mem, make_bzimage(), initrd=INITRD)
    assert mem.read(0x500, 0x100) == bytes([FILL]) * 0x100  # GDT
    assert mem.read(0x9000, 0x7000) == bytes([FILL]) * 0x7000  # page tables


# ---- failures ----


def expect(message: str, kernel: bytes, mem: GuestMemory | None = None, **kw: object) -> None:
    with pytest.raises(LoaderError, match=message):
        load(mem or guest_memory(), kernel, **kw)


def test_old_protocol() -> None:
    expect("bzImage boot protocol 2.11 is too old: 64-bit boot needs 2.12 or later",
           make_bzimage(version=0x020B))


def test_no_64_bit_entry() -> None:
    expect("no 64-bit entry point", make_bzimage(xloadflags=0x02))


def test_zimage() -> None:
    expect("LOADED_HIGH clear", make_bzimage(loadflags=0))


def test_init_size_too_big() -> None:
    expect(r"kernel needs 8 MiB \(init_size\) from 0x200000.*guest memory is 4 MiB",
           make_bzimage(init_size=8 << 20))


def test_bad_kernel_alignment() -> None:
    expect("kernel_alignment 0x300000 is not a power of two", make_bzimage(kernel_alignment=0x300000))


@pytest.mark.parametrize("header_len", [0x60, 0x9F])
def test_bad_header_length(header_len: int) -> None:
    expect("setup header ends at", make_bzimage(header_len=header_len))


@pytest.mark.parametrize("cut", [0x206, 0x240, 0x26B])
def test_truncated_in_the_header(cut: int) -> None:
    expect("bzImage is truncated", make_bzimage()[:cut])


@pytest.mark.parametrize("cut", [0x300, 5 * 512, 5 * 512 + 100])
def test_truncated_in_the_kernel(cut: int) -> None:
    expect(f"bzImage is truncated: the protected-mode kernel at 0xa00 needs {len(BZ_PAYLOAD)} bytes",
           make_bzimage()[:cut])


def test_initrd_too_big() -> None:
    # Above the kernel's footprint (0x300000) only 1 MiB is left.
    expect(r"initrd of 1.5 MiB does not fit in guest memory \(4 MiB\)", make_bzimage(),
           initrd=bytes(3 << 19))
