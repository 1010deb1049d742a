"""The guest kernel's log, read by the host straight from guest memory.

Linux (5.10 on) keeps its log in a lockless ring (kernel/printk/
printk_ringbuffer.h): a ring of descriptors, a parallel ring of printk_info
(sequence number, timestamp, text length, level) and a ring of text blocks.
`prb` points at the one in use (printk_rb_static, or printk_rb_dynamic with
log_buf_len=). With the VM stopped, walking it from tail to head gives every
record the kernel still holds, `quiet` or not, a panic's included, as `dmesg`
prints them: at no cost to the guest (MicroVM(full_log=True)).

The guest is not trusted: every pointer, count and position is checked, every
read goes through GuestMemory (inside guest RAM or an error), and the walk is
bounded by the descriptor count. A log that does not add up is a PrintkError.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from microvm import loader
from microvm.errors import MicroVMError
from microvm.kernellog import FULL_LOG_ARG, merge_log
from microvm.memory import GuestMemory, GuestMemoryError

if TYPE_CHECKING:
    from microvm.vm import Vm

# Where the kernel's direct map of physical memory starts, with 4- and
# 5-level paging (no KASLR: our kernel is not relocatable); memblock puts a
# log_buf_len= buffer there.
DIRECT_MAPS = (0xFFFF888000000000, 0xFF11000000000000)
DIRECT_MAP_SPAN = 1 << 46
# struct printk_ringbuffer on x86-64, Linux 6.1: desc_ring {count_bits, descs,
# infos, head_id, tail_id, last_finalized_id}, text_data_ring {size_bits, data,
# head_lpos, tail_lpos}, fail. 5.10-5.19 lack last_finalized_id: the text ring
# then starts 8 bytes earlier (told apart by its size_bits, below).
RING = struct.Struct("<I4xQQQQ")  # count_bits, descs, infos, head_id, tail_id
DATA_RING = struct.Struct("<I4xQ")  # size_bits, data
DATA_RING_AT = (48, 40)
RING_SIZE = 88
DESC = struct.Struct("<QQQ")  # state_var, text_blk_lpos.begin, .next
INFO = struct.Struct("<QQH")  # seq, ts_nsec, text_len (then facility, flags/level, caller_id, dev_info)
INFO_SIZE = 88
PRB_AVGBITS = 5  # the text ring is 2^5 bytes per descriptor (printk.c)
MAX_COUNT_BITS = 24  # 16 Mi records: far past any log_buf_len the kernel takes
ID_MASK = (1 << 62) - 1  # DESC_ID_MASK: the top two bits are the state
COMMITTED, FINALIZED = 1, 2
U64 = (1 << 64) - 1


class PrintkError(MicroVMError):
    """The guest's log buffer could not be read: not where its symbol says,
    or not what Linux 5.10-6.x leaves there."""


class FullLog:
    """MicroVM(full_log=True): every kernel message in RunResult.console at the
    cost of a `quiet` boot. The host reads the log from guest memory as the VM
    closes; for a kernel without the symbols to find it (a bzImage), init
    sends it (`dmesg`) over hvc1 before it reports (guestinit.sendlog).
    Either way kernellog.merge_log puts it in the console."""

    def __init__(self) -> None:
        self.by_host = False
        self.dmesg = bytearray()  # "[time] text" lines
        self.error = ""

    def plan(self, kernel: Path) -> bool:
        """Whether the host reads the log (else init's hvc1 is needed)."""
        self.by_host = loader.has_log_symbol(kernel)
        return self.by_host

    def cmdline(self) -> str:
        # (A user's loglevel=, later on the line, wins over this quiet.)
        return "quiet" if self.by_host else f"quiet {FULL_LOG_ARG}"

    def watch(self, vm: Vm, boot: loader.BootInfo) -> None:
        if self.by_host and boot.log_pointer is not None:
            vm.before_unmap.append(functools.partial(self._read, vm.mem, boot.log_pointer, boot.kernel_map))

    def _read(self, mem: GuestMemory, pointer: int, kernel_map: Sequence[tuple[int, int, int]]) -> None:
        try:
            self.dmesg[:] = read_log(mem, pointer, kernel_map)
        except Exception as e:  # a teardown hook (Vm.close): whatever the guest left there, closing goes on
            self.error = f"microvm: full_log: {e}\r\n"

    def merged(self, console: bytes) -> bytes:
        return (merge_log(console, bytes(self.dmesg)) if self.dmesg else console) + self.error.encode()


def read_log(mem: GuestMemory, pointer: int, kernel_map: Sequence[tuple[int, int, int]]) -> bytes:
    """Every record of the log `prb` (at kernel address `pointer`) points to,
    as `dmesg` prints them: "[seconds.micros] text\\n", a line per line."""
    try:
        return _read(mem, pointer, kernel_map)
    except (GuestMemoryError, struct.error) as e:
        raise PrintkError(f"the kernel's log buffer cannot be read: {e}") from e


def _read(mem: GuestMemory, pointer: int, kernel_map: Sequence[tuple[int, int, int]]) -> bytes:
    def phys(vaddr: int, length: int) -> int:
        for start, paddr, size in kernel_map:
            if start <= vaddr and vaddr + length <= start + size:
                return paddr + vaddr - start
        for base in DIRECT_MAPS:
            if base <= vaddr and vaddr + length <= base + DIRECT_MAP_SPAN:
                return vaddr - base
        raise PrintkError(f"the log buffer's address {vaddr:#x} is in neither the kernel image nor the direct map")

    def read(vaddr: int, length: int) -> bytes:
        return mem.read(phys(vaddr, length), length)

    (rb_addr,) = struct.unpack("<Q", read(pointer, 8))
    rb = read(rb_addr, RING_SIZE)
    count_bits, descs_at, infos_at, head_id, tail_id = RING.unpack_from(rb)
    if not 1 <= count_bits <= MAX_COUNT_BITS:
        raise PrintkError(f"a ring of 2^{count_bits} records")
    for at in DATA_RING_AT:
        size_bits, data_at = DATA_RING.unpack_from(rb, at)
        if size_bits == count_bits + PRB_AVGBITS:
            break
    else:
        raise PrintkError(f"no text ring of 2^{count_bits + PRB_AVGBITS} bytes beside 2^{count_bits} records")
    count, size = 1 << count_bits, 1 << size_bits
    descs = read(descs_at, count * DESC.size)
    infos = read(infos_at, count * INFO_SIZE)
    data = read(data_at, size)
    lines: list[bytes] = []
    n = min(((head_id - tail_id) & ID_MASK) + 1, count)
    for k in range(n):
        rid = (tail_id + k) & ID_MASK
        i = rid & (count - 1)
        state_var, begin, end = DESC.unpack_from(descs, i * DESC.size)
        if state_var & ID_MASK != rid or state_var >> 62 not in (COMMITTED, FINALIZED):
            continue  # overwritten, being written, or free
        _, ts_nsec, text_len = INFO.unpack_from(infos, i * INFO_SIZE)
        text = _text(data, size_bits, begin, end, rid, text_len)
        if text is None:
            continue
        prefix = b"[%5d.%06d] " % (ts_nsec // 1_000_000_000, ts_nsec % 1_000_000_000 // 1000)
        lines.extend(prefix + line for line in text.split(b"\n"))
    return b"".join(line + b"\n" for line in lines)


def _text(data: bytes, size_bits: int, begin: int, end: int, rid: int, text_len: int) -> bytes | None:
    """A record's text from its data block (get_data() in the kernel), or None
    for a record without one (lost) or a block that does not check out."""
    if begin & 1 or end & 1:  # FAILED_LPOS, NO_LPOS: a record without text
        return None
    size = 1 << size_bits
    if begin >> size_bits == end >> size_bits and begin < end:  # the block lies in one wrap of the ring
        at, length = begin & (size - 1), (end - begin) & U64
    elif ((begin + size) & U64) >> size_bits == end >> size_bits:  # it wrapped: it starts at 0
        at, length = 0, end & (size - 1)
    else:
        return None
    if length < 8 or at + length > size or struct.unpack_from("<Q", data, at)[0] & ID_MASK != rid:
        return None
    return data[at + 8:at + 8 + min(text_len, length - 8)]
