"""Local APIC wiring at boot (Intel SDM Vol. 3A, 10.5.1).

LINT0 delivers the legacy PIC's interrupts (ExtINT) and LINT1 the NMI, the
way a PC's BIOS leaves them; the register offsets are the APIC's own
(0x350 LVT LINT0, 0x360 LVT LINT1) within the KVM_GET_LAPIC page.
"""

from __future__ import annotations

APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def _set_delivery_mode(reg: int, mode: int) -> int:
    return (reg & ~0x700) | (mode << 8)


def wire_lints(state: bytes) -> bytes:
    """Return the lapic state with LINT0 = ExtINT and LINT1 = NMI."""
    regs = bytearray(state)
    for off, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        value = int.from_bytes(regs[off:off + 4], "little")
        regs[off:off + 4] = _set_delivery_mode(value, mode).to_bytes(4, "little")
    return bytes(regs)
