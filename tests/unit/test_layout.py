"""The memory map (arch/x86_64/layout.py): nothing overlaps, everything fits,
and no other module defines a guest address."""

from __future__ import annotations

import ast
import re
from itertools import pairwise
from pathlib import Path

import pytest

from microvm.arch.x86_64 import layout as L
from microvm.arch.x86_64 import mptable, paging
from microvm.devicemanager import MAX_USER_DEVICES, Pool
from microvm.errors import ConfigError
from microvm.loader import elf
from microvm.memory import GuestMemory

PACKAGE = Path(__file__).resolve().parents[2] / "microvm"


def test_low_memory_structures_do_not_overlap_and_stay_below_the_kernel():
    mem = GuestMemory.anonymous([(0, 2 * L.MIB)])
    try:
        tables_end = paging.identity_map(mem, L.PML4_ADDR, gib=4)
    finally:
        mem.close()
    ranges = sorted([
        ("GDT", L.GDT_ADDR, L.GDT_ADDR + 0x100),
        ("start info", L.START_INFO, L.PVH_MEMMAP_END),
        ("zero page", L.ZERO_PAGE, L.ZERO_PAGE + L.PAGE_SIZE),
        ("page tables", L.PML4_ADDR, tables_end),
        ("cmdline", L.CMDLINE, L.CMDLINE + L.CMDLINE_MAX),
        ("EBDA", L.EBDA_START, L.LOW_RAM_END),
        ("BIOS", L.BIOS_START, L.HIMEM_START),
    ], key=lambda r: r[1])
    for (a, _, a_end), (b, b_start, _) in pairwise(ranges):
        assert a_end <= b_start, f"{a} runs into {b}"
    assert tables_end <= L.PAGE_TABLES_END
    assert L.PVH_MEMMAP + elf.MEMMAP_MAX * 24 <= L.PVH_MEMMAP_END  # hvm_memmap_table_entry: 24 bytes
    assert L.MPTABLE_START + len(mptable.build(254)) <= L.HIMEM_START


def test_the_device_gap_holds_every_window_and_keeps_clear_of_ram_and_kvm():
    gap = sorted([
        ("control", L.CONTROL_BASE, L.CONTROL_BASE + L.CONTROL_SIZE),
        ("virtio", L.VIRTIO_MMIO_BASE, L.VIRTIO_MMIO_END),
        ("I/O APIC", L.IOAPIC_BASE, L.IOAPIC_BASE + L.PAGE_SIZE),
        ("local APIC", L.LAPIC_BASE, L.LAPIC_BASE + L.PAGE_SIZE),
        ("KVM identity map", L.KVM_IDENTITY_MAP_ADDR, L.KVM_IDENTITY_MAP_ADDR + L.PAGE_SIZE),
        ("KVM TSS", L.KVM_TSS_ADDR, L.KVM_TSS_ADDR + 3 * L.PAGE_SIZE),
    ], key=lambda r: r[1])
    for (a, _, a_end), (b, b_start, _) in pairwise(gap):
        assert a_end <= b_start, f"{a} runs into {b}"
    assert L.MMIO_GAP_START <= gap[0][1] and gap[-1][2] <= L.MMIO_GAP_END
    assert L.ram_ranges(4 * L.GIB) == [(0, L.MMIO_GAP_START), (L.MMIO_GAP_END, L.GIB)]
    ram, reserved = L.e820(L.ram_ranges(128 * L.MIB))
    assert ram == [(0, L.EBDA_START), (L.HIMEM_START, 127 * L.MIB)]
    assert (L.BIOS_START, L.HIMEM_START - L.BIOS_START) in reserved


def test_virtio_lines_are_io_apic_pins_clear_of_the_isa_ones_we_use():
    assert L.VIRTIO_IRQS.stop <= L.IOAPIC_PINS and L.COM1_IRQ not in L.VIRTIO_IRQS
    assert MAX_USER_DEVICES == len(L.VIRTIO_IRQS) - 2 == 17  # the README says so


def test_a_pool_hands_out_each_value_once_then_names_its_limit():
    pool = Pool("interrupt lines", L.VIRTIO_IRQS)
    taken = [pool.take() for _ in range(len(L.VIRTIO_IRQS))]
    assert taken == list(L.VIRTIO_IRQS) and pool.left == 0
    with pytest.raises(ConfigError, match="no interrupt lines left: a VM has 19"):
        pool.take()


ADDRESS_NAME = re.compile(r"(_ADDR|_BASE|_START|_END|_PORT|^GDT|^TSS|^PML4|^STACK|^CODE)$")


def test_no_module_but_layout_defines_a_guest_address():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "arch" / "x86_64" / "layout.py":
            continue
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.Assign | ast.AnnAssign):
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            literal = isinstance(node.value, ast.Constant | ast.BinOp)
            for t in targets:
                if isinstance(t, ast.Name) and ADDRESS_NAME.search(t.id) and literal and not t.id.startswith("MSR_"):
                    found.append(f"{path.relative_to(PACKAGE)}: {t.id}")
    assert not found
