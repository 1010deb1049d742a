"""Identity-mapped 4-level page tables for a 64-bit entry (SDM Vol. 3A, 4.5)."""

from __future__ import annotations

from microvm.memory import GuestMemory

PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2
PTE_PS = 1 << 7  # 2 MiB page in a PD entry

PAGE_2M = 2 << 20
GIB = 1 << 30


def identity_map(mem: GuestMemory, pml4: int, gib: int = 4, user: bool = False) -> int:
    """Map virtual [0, gib GiB) to the same physical addresses with 2 MiB pages.

    Tables are written at pml4 (PML4), pml4+4K (PDPT) and pml4+8K.. (one PD per
    GiB). Returns the address just past the last table.
    """
    if not 1 <= gib <= 512:
        raise ValueError("gib must be between 1 and 512")
    flags = PTE_PRESENT | PTE_WRITE | (PTE_USER if user else 0)
    pdpt = pml4 + 0x1000
    pd = pdpt + 0x1000
    mem.fill(pml4, 0x1000)
    mem.fill(pdpt, 0x1000)
    mem.write_int(pml4, 8, pdpt | flags)
    for g in range(gib):
        table = pd + g * 0x1000
        mem.write_int(pdpt + 8 * g, 8, table | flags)
        entries = b"".join(
            ((g * GIB + i * PAGE_2M) | flags | PTE_PS).to_bytes(8, "little") for i in range(512))
        mem.write(table, entries)
    return pd + gib * 0x1000
