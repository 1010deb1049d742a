"""Segment descriptors (Intel SDM Vol. 3A, 3.4.5) and their KVM form."""

from __future__ import annotations

from typing import Any

# Access/flag words as (flags << 12 | access): G, D/B, L | P, DPL, S, type.
CODE64_KERNEL = 0xA09B  # G=1 L=1, P=1 DPL=0 S=1 type=execute/read, accessed
DATA_KERNEL = 0xC093  # G=1 D/B=1, P=1 DPL=0 S=1 type=read/write, accessed
CODE32_KERNEL = 0xC09B  # G=1 D/B=1, P=1 DPL=0 S=1 type=execute/read, accessed
CODE64_USER = 0xA0FB  # as CODE64_KERNEL with DPL=3
DATA_USER = 0xC0F3  # as DATA_KERNEL with DPL=3
TSS64 = 0x008B  # P=1 type=busy 64-bit TSS


def descriptor(flags: int, base: int, limit: int) -> int:
    """The 8-byte GDT entry for a segment."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


def kvm_segment(flags: int, base: int, limit: int, selector: int) -> dict[str, Any]:
    """The struct kvm_segment KVM_SET_SREGS wants for the same segment."""
    granular = (flags >> 15) & 1
    return {
        "base": base,
        "limit": (limit << 12 | 0xFFF) if granular else limit,
        "selector": selector,
        "type": flags & 0xF,
        "present": (flags >> 7) & 1,
        "dpl": (flags >> 5) & 3,
        "db": (flags >> 14) & 1,
        "s": (flags >> 4) & 1,
        "l": (flags >> 13) & 1,
        "g": granular,
        "avl": (flags >> 12) & 1,
        "unusable": 0 if (flags >> 7) & 1 else 1,
    }
