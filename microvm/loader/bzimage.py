"""bzImage booted through the 64-bit boot protocol (Documentation/x86/boot.rst).

The file is a real-mode setup ((setup_sects + 1) * 512 bytes, with the setup
header at 0x1f1) followed by the protected-mode kernel. We never run the setup:
the protected-mode kernel is copied high, struct boot_params (the "zero page")
is built from the file's setup header, and the vCPU enters in 64-bit mode at
the load address + 0x200 with %rsi pointing at the zero page ("64-bit Boot
Protocol").
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from microvm.arch.x86_64.layout import HIMEM_START, ZERO_PAGE
from microvm.errors import LoaderError
from microvm.loader.layout import KernelTooBigError, LoadedKernel, align_up, mib
from microvm.memory import GuestMemory

HDRS_MAGIC = 0x53726448  # "HdrS" at 0x202
SETUP_HEADER_OFFSET = 0x1F1
MIN_VERSION = 0x020C  # 2.12 added xloadflags and with it XLF_KERNEL_64
HEADER_END_2_12 = 0x268  # the last 2.12 field, handover_offset, ends here
ENTRY_64_OFFSET = 0x200  # "the start address of loaded 64-bit kernel plus 0x200"

# arch/x86/include/uapi/asm/bootparam.h
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
E820_MAX_ENTRIES_ZEROPAGE = 128

TYPE_OF_LOADER_UNDEFINED = 0xFF  # boot.rst type_of_loader: no assigned id
VID_MODE_NORMAL = 0xFFFF  # boot.rst "vga=normal"
HEAP_END_PTR = 0xFE00  # boot.rst sample: heap_end (0x10000 here) - 0x200
INITRD_ADDR_MAX_DEFAULT = 0x37FFFFFF  # boot.rst initrd_addr_max, protocols before 2.03


class SetupHeader(ctypes.LittleEndianStructure):
    """arch/x86/include/uapi/asm/bootparam.h (offsets in boot_params per boot.rst)::

    struct setup_header {
        __u8    setup_sects;            __u16   root_flags;
        __u32   syssize;                __u16   ram_size;
        __u16   vid_mode;               __u16   root_dev;
        __u16   boot_flag;              __u16   jump;
        __u32   header;                 __u16   version;
        __u32   realmode_swtch;         __u16   start_sys_seg;
        __u16   kernel_version;         __u8    type_of_loader;
        __u8    loadflags;              __u16   setup_move_size;
        __u32   code32_start;           __u32   ramdisk_image;
        __u32   ramdisk_size;           __u32   bootsect_kludge;
        __u16   heap_end_ptr;           __u8    ext_loader_ver;
        __u8    ext_loader_type;        __u32   cmd_line_ptr;
        __u32   initrd_addr_max;        __u32   kernel_alignment;
        __u8    relocatable_kernel;     __u8    min_alignment;
        __u16   xloadflags;             __u32   cmdline_size;
        __u32   hardware_subarch;       __u64   hardware_subarch_data;
        __u32   payload_offset;         __u32   payload_length;
        __u64   setup_data;             __u64   pref_address;
        __u32   init_size;              __u32   handover_offset;
        __u32   kernel_info_offset;
    } __attribute__((packed));
    """

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),
        ("root_flags", ctypes.c_uint16),
        ("syssize", ctypes.c_uint32),
        ("ram_size", ctypes.c_uint16),
        ("vid_mode", ctypes.c_uint16),
        ("root_dev", ctypes.c_uint16),
        ("boot_flag", ctypes.c_uint16),
        ("jump", ctypes.c_uint16),
        ("header", ctypes.c_uint32),
        ("version", ctypes.c_uint16),
        ("realmode_swtch", ctypes.c_uint32),
        ("start_sys_seg", ctypes.c_uint16),
        ("kernel_version", ctypes.c_uint16),
        ("type_of_loader", ctypes.c_uint8),
        ("loadflags", ctypes.c_uint8),
        ("setup_move_size", ctypes.c_uint16),
        ("code32_start", ctypes.c_uint32),
        ("ramdisk_image", ctypes.c_uint32),
        ("ramdisk_size", ctypes.c_uint32),
        ("bootsect_kludge", ctypes.c_uint32),
        ("heap_end_ptr", ctypes.c_uint16),
        ("ext_loader_ver", ctypes.c_uint8),
        ("ext_loader_type", ctypes.c_uint8),
        ("cmd_line_ptr", ctypes.c_uint32),
        ("initrd_addr_max", ctypes.c_uint32),
        ("kernel_alignment", ctypes.c_uint32),
        ("relocatable_kernel", ctypes.c_uint8),
        ("min_alignment", ctypes.c_uint8),
        ("xloadflags", ctypes.c_uint16),
        ("cmdline_size", ctypes.c_uint32),
        ("hardware_subarch", ctypes.c_uint32),
        ("hardware_subarch_data", ctypes.c_uint64),
        ("payload_offset", ctypes.c_uint32),
        ("payload_length", ctypes.c_uint32),
        ("setup_data", ctypes.c_uint64),
        ("pref_address", ctypes.c_uint64),
        ("init_size", ctypes.c_uint32),
        ("handover_offset", ctypes.c_uint32),
        ("kernel_info_offset", ctypes.c_uint32),
    ]


class BootE820Entry(ctypes.LittleEndianStructure):
    """bootparam.h::

    struct boot_e820_entry {
        __u64 addr;
        __u64 size;
        __u32 type;
    } __attribute__((packed));
    """

    _pack_ = 1
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("type", ctypes.c_uint32)]


def _u8(n: int) -> type[ctypes.Array[ctypes.c_uint8]]:
    return ctypes.c_uint8 * n


class BootParams(ctypes.LittleEndianStructure):
    """bootparam.h, struct boot_params (the "zero page"), 4096 bytes, packed.

    The legacy BIOS/firmware blocks we never fill (screen_info, apm_bios_info,
    ist_info, sys_desc_table, olpc_ofw_header, edid_info, efi_info, eddbuf) are
    kept as byte arrays of their C size under their C names::

        struct screen_info screen_info;             /* 0x000 */
        struct apm_bios_info apm_bios_info;         /* 0x040 */
        __u8  _pad2[4];                             /* 0x054 */
        __u64  tboot_addr;                          /* 0x058 */
        struct ist_info ist_info;                   /* 0x060 */
        __u64 acpi_rsdp_addr;                       /* 0x070 */
        __u8  _pad3[8];                             /* 0x078 */
        __u8  hd0_info[16];     /* obsolete! */     /* 0x080 */
        __u8  hd1_info[16];     /* obsolete! */     /* 0x090 */
        struct sys_desc_table sys_desc_table;       /* 0x0a0 */
        struct olpc_ofw_header olpc_ofw_header;     /* 0x0b0 */
        __u32 ext_ramdisk_image;                    /* 0x0c0 */
        __u32 ext_ramdisk_size;                     /* 0x0c4 */
        __u32 ext_cmd_line_ptr;                     /* 0x0c8 */
        __u8  _pad4[112];                           /* 0x0cc */
        __u32 cc_blob_address;                      /* 0x13c */
        struct edid_info edid_info;                 /* 0x140 */
        struct efi_info efi_info;                   /* 0x1c0 */
        __u32 alt_mem_k;                            /* 0x1e0 */
        __u32 scratch;          /* Scratch field! */ /* 0x1e4 */
        __u8  e820_entries;                         /* 0x1e8 */
        __u8  eddbuf_entries;                       /* 0x1e9 */
        __u8  edd_mbr_sig_buf_entries;              /* 0x1ea */
        __u8  kbd_status;                           /* 0x1eb */
        __u8  secure_boot;                          /* 0x1ec */
        __u8  _pad5[2];                             /* 0x1ed */
        __u8  sentinel;                             /* 0x1ef */
        __u8  _pad6[1];                             /* 0x1f0 */
        struct setup_header hdr;    /* setup header */  /* 0x1f1 */
        __u8  _pad7[0x290-0x1f1-sizeof(struct setup_header)];
        __u32 edd_mbr_sig_buffer[EDD_MBR_SIG_MAX];  /* 0x290 */
        struct boot_e820_entry e820_table[E820_MAX_ENTRIES_ZEROPAGE]; /* 0x2d0 */
        __u8  _pad8[48];                            /* 0xcd0 */
        struct edd_info eddbuf[EDDMAXNR];           /* 0xd00 */
        __u8  _pad9[276];                           /* 0xeec */
    } __attribute__((packed));
    """

    _pack_ = 1
    _fields_ = [
        ("screen_info", _u8(0x40)),
        ("apm_bios_info", _u8(0x14)),
        ("_pad2", _u8(4)),
        ("tboot_addr", ctypes.c_uint64),
        ("ist_info", _u8(0x10)),
        ("acpi_rsdp_addr", ctypes.c_uint64),
        ("_pad3", _u8(8)),
        ("hd0_info", _u8(16)),
        ("hd1_info", _u8(16)),
        ("sys_desc_table", _u8(0x10)),
        ("olpc_ofw_header", _u8(0x10)),
        ("ext_ramdisk_image", ctypes.c_uint32),
        ("ext_ramdisk_size", ctypes.c_uint32),
        ("ext_cmd_line_ptr", ctypes.c_uint32),
        ("_pad4", _u8(112)),
        ("cc_blob_address", ctypes.c_uint32),
        ("edid_info", _u8(0x80)),
        ("efi_info", _u8(0x20)),
        ("alt_mem_k", ctypes.c_uint32),
        ("scratch", ctypes.c_uint32),
        ("e820_entries", ctypes.c_uint8),
        ("eddbuf_entries", ctypes.c_uint8),
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),
        ("kbd_status", ctypes.c_uint8),
        ("secure_boot", ctypes.c_uint8),
        ("_pad5", _u8(2)),
        ("sentinel", ctypes.c_uint8),
        ("_pad6", _u8(1)),
        ("hdr", SetupHeader),
        ("_pad7", _u8(0x290 - 0x1F1 - ctypes.sizeof(SetupHeader))),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * 16),  # EDD_MBR_SIG_MAX (edd.h)
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),
        ("_pad8", _u8(48)),
        ("eddbuf", _u8(6 * 82)),  # EDDMAXNR struct edd_info (edd.h), 82 bytes each
        ("_pad9", _u8(276)),
    ]


assert ctypes.sizeof(BootParams) == 4096, "boot_params must be exactly one page"


@dataclass(frozen=True)
class BzImage:
    """A checked bzImage: its setup header and the protected-mode kernel bytes."""

    header: SetupHeader
    header_bytes: bytes  # file bytes 0x1f1 .. 0x202 + byte at 0x201 (boot.rst)
    kernel: memoryview

    @property
    def cmdline_size(self) -> int:
        return int(self.header.cmdline_size)

    @property
    def initrd_limit(self) -> int:
        """One past the highest byte the initrd may occupy."""
        return (self.header.initrd_addr_max or INITRD_ADDR_MAX_DEFAULT) + 1


def is_bzimage(data: bytes) -> bool:
    return data[0x202:0x206] == HDRS_MAGIC.to_bytes(4, "little")


def parse(data: bytes) -> BzImage:
    """Check the setup header and split off the protected-mode kernel."""
    if len(data) < SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader):
        raise LoaderError(f"bzImage is truncated: {len(data)} bytes, shorter than its setup header")
    hdr = SetupHeader.from_buffer_copy(data, SETUP_HEADER_OFFSET)
    if hdr.header != HDRS_MAGIC:
        raise LoaderError("not a bzImage: no HdrS signature at 0x202")
    if hdr.version < MIN_VERSION:
        raise LoaderError(
            f"bzImage boot protocol {hdr.version >> 8}.{hdr.version & 0xFF:02d} is too old: "
            "64-bit boot needs 2.12 or later"
        )
    # boot.rst, "64-bit Boot Protocol": the header ends at 0x202 + the byte at
    # 0x201 (the jump's offset); it must cover 2.12's fields and fit the hole
    # before edd_mbr_sig_buffer in boot_params.
    header_end = 0x202 + data[0x201]
    if not HEADER_END_2_12 <= header_end <= 0x290:
        raise LoaderError(f"bzImage setup header ends at {header_end:#x}, outside {HEADER_END_2_12:#x}..0x290")
    if not hdr.loadflags & LOADED_HIGH:
        raise LoaderError("bzImage does not load high (LOADED_HIGH clear): a zImage cannot be booted")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise LoaderError("bzImage has no 64-bit entry point (XLF_KERNEL_64 clear in xloadflags)")
    align = hdr.kernel_alignment
    if hdr.relocatable_kernel and (align == 0 or align & (align - 1)):
        raise LoaderError(f"bzImage kernel_alignment {align:#x} is not a power of two")

    setup_sects = hdr.setup_sects or 4  # boot.rst: "If this field is 0, the real value is 4."
    offset = (setup_sects + 1) * 512
    need = hdr.syssize * 16  # syssize counts 16-byte paragraphs of protected-mode code
    if len(data) - offset < max(need, 1):
        raise LoaderError(
            f"bzImage is truncated: the protected-mode kernel at {offset:#x} needs {need} bytes, "
            f"the file has {max(len(data) - offset, 0)}"
        )
    return BzImage(hdr, data[SETUP_HEADER_OFFSET:header_end], memoryview(data)[offset:])


def _runtime_start(hdr: SetupHeader, load_addr: int) -> int:
    """Where the kernel decompresses itself and runs (boot.rst init_size).

    arch/x86/boot/compressed/head_64.S goes one step past boot.rst: a
    relocatable kernel runs at align_up(load, kernel_alignment) but never below
    LOAD_PHYSICAL_ADDR, which header.S publishes as pref_address.
    """
    if hdr.relocatable_kernel:
        return max(align_up(load_addr, hdr.kernel_alignment), hdr.pref_address)
    return int(hdr.pref_address) or load_addr


def load(mem: GuestMemory, image: BzImage) -> LoadedKernel:
    """Copy the protected-mode kernel high; its footprint must fit in guest RAM."""
    hdr = image.header
    size = len(image.kernel)
    candidates = [HIMEM_START]
    if hdr.relocatable_kernel and hdr.pref_address >= HIMEM_START:
        candidates.insert(0, int(hdr.pref_address))  # boot.rst pref_address: "should attempt"
    for load_addr in candidates:
        runtime = _runtime_start(hdr, load_addr)
        fits = (
            runtime >= HIMEM_START
            and mem.contains(load_addr, size)
            and mem.contains(runtime, max(hdr.init_size, 1))
        )
        if fits:
            break
    else:
        runtime = _runtime_start(hdr, HIMEM_START)
        raise KernelTooBigError(
            max(HIMEM_START + size, runtime + hdr.init_size),
            f"kernel needs {mib(hdr.init_size)} MiB (init_size) from {runtime:#x} and "
            f"{mib(size)} MiB from {load_addr:#x}; guest memory is {mib(mem.size)} MiB"
        )
    mem.write(load_addr, image.kernel)
    end = max(load_addr + size, runtime + hdr.init_size)
    return LoadedKernel(load_addr + ENTRY_64_OFFSET, load_addr, end)


def write_boot_params(
    mem: GuestMemory,
    image: BzImage,
    kernel: LoadedKernel,
    *,
    cmdline_addr: int,
    initrd: tuple[int, int] | None,
    e820: list[tuple[int, int, int]],
) -> int:
    """Build the zero page from the file's setup header; return its address."""
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise LoaderError(f"memory map has {len(e820)} entries, boot_params holds {E820_MAX_ENTRIES_ZEROPAGE}")
    # boot.rst, "64-bit Boot Protocol": a zeroed boot_params with the setup
    # header copied in from the file, then the loader's fields on top.
    raw = bytearray(ctypes.sizeof(BootParams))
    raw[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(image.header_bytes)] = image.header_bytes
    params = BootParams.from_buffer(raw)
    hdr = params.hdr
    hdr.vid_mode = VID_MODE_NORMAL
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.loadflags |= CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.code32_start = kernel.start & 0xFFFFFFFF  # boot.rst code32_start: relocated kernels set it
    hdr.cmd_line_ptr = cmdline_addr & 0xFFFFFFFF
    params.ext_cmd_line_ptr = cmdline_addr >> 32
    if initrd is not None:
        addr, size = initrd
        hdr.ramdisk_image, params.ext_ramdisk_image = addr & 0xFFFFFFFF, addr >> 32
        hdr.ramdisk_size, params.ext_ramdisk_size = size & 0xFFFFFFFF, size >> 32
    for i, (addr, size, kind) in enumerate(e820):
        params.e820_table[i] = BootE820Entry(addr, size, kind)
    params.e820_entries = len(e820)
    mem.write_obj(ZERO_PAGE, params)
    return ZERO_PAGE
