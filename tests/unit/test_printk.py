"""The host's reader of the guest kernel's log ring (microvm/printk.py), against
rings written here the way Linux 6.1's printk_ringbuffer.c writes them, and
against garbage: whatever is in guest memory, a PrintkError or lines, never
another exception and never a read outside guest memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from microvm.memory import GuestMemory
from microvm.printk import DIRECT_MAPS, PrintkError, read_log

KERNEL_V, KERNEL_P, KERNEL_SIZE = 0xFFFFFFFF81000000, 0x100000, 0x100000
KERNEL_MAP = [(KERNEL_V, KERNEL_P, KERNEL_SIZE)]
POINTER = KERNEL_V  # `prb`
RB = KERNEL_V + 0x100  # printk_rb_static
DESCS = KERNEL_V + 0x1000
DATA_P = 0x280000  # the text ring, in the direct map (as with log_buf_len=)
RESERVED, COMMITTED, FINALIZED, REUSABLE = 0, 1, 2, 3


class Ring:
    """A printk ring in a GuestMemory, written as the kernel writes it
    (data_alloc, desc_push_tail), with a small ring to make it wrap."""

    def __init__(self, count_bits: int = 4, size_bits: int = 9, last_finalized: bool = True):
        self.mem = GuestMemory([(0, bytearray(4 << 20))])
        self.count_bits, self.size_bits, self.last_finalized = count_bits, size_bits, last_finalized
        self.count, self.size = 1 << count_bits, 1 << size_bits
        self.infos = DESCS + self.count * 24
        self.head_id, self.tail_id = -1, 0
        self.head_lpos = self.tail_lpos = 0
        self.blocks: dict[int, tuple[int, int]] = {}  # id -> (begin, next)
        self.mem.write(KERNEL_P, struct.pack("<Q", RB))
        self._write_ring()

    def _phys(self, vaddr: int) -> int:
        return vaddr - KERNEL_V + KERNEL_P

    def _write_ring(self) -> None:
        head = self.head_id & ((1 << 62) - 1)
        ring = struct.pack("<I4xQQQQ", self.count_bits, DESCS, self.infos, head, self.tail_id)
        if self.last_finalized:
            ring += struct.pack("<Q", head)
        ring += struct.pack("<I4xQQQ", self.size_bits, DIRECT_MAPS[0] + DATA_P, self.head_lpos, self.tail_lpos)
        self.mem.write(self._phys(RB), ring)

    def _desc(self, rid: int, state: int, begin: int, end: int) -> None:
        i = rid % self.count
        self.mem.write(self._phys(DESCS) + i * 24, struct.pack("<QQQ", (state << 62) | rid, begin, end))

    def add(self, text: bytes, ts_nsec: int, state: int = FINALIZED) -> None:
        rid = self.head_id + 1
        if rid - self.tail_id >= self.count:  # the descriptor ring is full: its oldest goes
            self._drop_oldest()
        need = (8 + len(text) + 7) & ~7
        begin = self.head_lpos
        end = begin + need
        wraps = begin // self.size != end // self.size
        if wraps:  # it would cross the end: stored from 0, in the next wrap (get_next_lpos)
            end = (end // self.size) * self.size + need
        while end - self.tail_lpos > self.size:  # the text ring is full: the oldest records go
            self._drop_oldest()
        at = 0 if wraps else begin % self.size
        self.mem.write(DATA_P + at, struct.pack("<Q", rid) + text)
        self.mem.write(self._phys(self.infos) + (rid % self.count) * 88, struct.pack("<QQH", rid, ts_nsec, len(text)))
        self._desc(rid, state, begin, end)
        self.blocks[rid] = (begin, end)
        self.head_id, self.head_lpos = rid, end
        self._write_ring()

    def _drop_oldest(self) -> None:
        begin, end = self.blocks.pop(self.tail_id)
        self._desc(self.tail_id, REUSABLE, begin, end)
        self.tail_id += 1
        self.tail_lpos = self.blocks[self.tail_id][0] if self.tail_id in self.blocks else self.head_lpos

    def read(self) -> list[bytes]:
        return read_log(self.mem, POINTER, KERNEL_MAP).splitlines()


def test_records_read_as_dmesg_prints_them() -> None:
    ring = Ring()
    ring.add(b"Linux version 6.1", 0)
    ring.add(b"two lines\nsecond", 1_500_000_000)
    ring.add(b"x" * 37, 12_345_678_901)
    assert ring.read() == [b"[    0.000000] Linux version 6.1", b"[    1.500000] two lines",
                           b"[    1.500000] second", b"[   12.345678] " + b"x" * 37]


@pytest.mark.parametrize("last_finalized", [True, False], ids=["6.1", "5.10"])
def test_a_wrapped_ring_gives_the_records_it_still_holds_in_order(last_finalized: bool) -> None:
    ring = Ring(last_finalized=last_finalized)
    texts = [b"message %d " % i + b"." * (i % 23) for i in range(100)]
    for i, text in enumerate(texts):
        ring.add(text, i * 1000)
    got = ring.read()
    assert 5 <= len(got) <= ring.count
    assert got == [b"[    0.%06d] " % (i,) + texts[i] for i in range(100 - len(got), 100)]


def test_a_record_being_written_is_left_out_and_a_committed_one_is_in() -> None:
    ring = Ring()
    ring.add(b"done", 0)
    ring.add(b"open for continuation", 1000, state=COMMITTED)
    ring.add(b"half-written", 2000, state=RESERVED)
    assert ring.read() == [b"[    0.000000] done", b"[    0.000001] open for continuation"]


def test_a_pointer_outside_the_kernel_is_refused() -> None:
    ring = Ring()
    ring.mem.write(KERNEL_P, struct.pack("<Q", 0x1234))
    with pytest.raises(PrintkError, match="neither the kernel image nor the direct map"):
        ring.read()


def test_a_ring_bigger_than_guest_memory_is_refused() -> None:
    ring = Ring()
    ring.mem.write(ring._phys(RB), struct.pack("<I", 23))  # 8 Mi descriptors: past the 4 MiB of RAM
    with pytest.raises(PrintkError):
        ring.read()


@given(st.binary(min_size=0, max_size=512), st.integers(0, 0x1000 - 8), st.integers(0, 255))
def test_garbage_is_lines_or_a_printk_error(junk: bytes, where: int, size_bits: int) -> None:
    ring = Ring()
    for i in range(30):
        ring.add(b"message %d" % i, i)
    ring.mem.write(ring._phys(RB) + 48, struct.pack("<I", size_bits))
    ring.mem.write(ring._phys(DESCS) + where, junk[:0x1000 - where])
    try:
        lines = ring.read()
    except PrintkError:
        return
    assert all(line.startswith(b"[") for line in lines)
