"""The CPUID a vCPU sees: KVM_GET_SUPPORTED_CPUID, adjusted per vCPU.

Leaf numbers and bits from the Intel SDM Vol. 2A (CPUID) and
Documentation/virt/kvm/x86/cpuid.rst for the KVM leaves.
"""

from __future__ import annotations

from typing import Any

LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_EXT_TOPOLOGY = 0xB
LEAF_V2_EXT_TOPOLOGY = 0x1F
KVM_CPUID_SIGNATURE = 0x4000_0000
KVM_CPUID_FEATURES = 0x4000_0001

CPUID_1_ECX_HYPERVISOR = 1 << 31
CPUID_1_ECX_TSC_DEADLINE = 1 << 24
CPUID_1_EDX_HTT = 1 << 28

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"


def vcpu_cpuid(supported: list[dict[str, Any]], index: int, count: int,
               tsc_deadline: bool = False) -> list[dict[str, Any]]:
    """The entries for vCPU `index` of `count`, from KVM's supported list.

    tsc_deadline: KVM_CAP_TSC_DEADLINE_TIMER. KVM emulates the TSC-deadline
    timer mode but never lists it in KVM_GET_SUPPORTED_CPUID (api.rst); a
    guest that sees it skips calibrating the local APIC timer against the
    PIT (about 100 ms of a Linux boot).
    """
    entries = [dict(e) for e in supported]
    for e in entries:
        fn = e["function"]
        if fn == LEAF_FEATURES:
            # EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            e["ebx"] = (e["ebx"] & 0xFFFF) | (index << 24) | (max(count, 1) << 16)
            e["ecx"] |= CPUID_1_ECX_HYPERVISOR
            if tsc_deadline:
                e["ecx"] |= CPUID_1_ECX_TSC_DEADLINE
            if count > 1:
                e["edx"] |= CPUID_1_EDX_HTT
        elif fn in (LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY):
            e["edx"] = index  # x2APIC id of this logical processor
        elif fn == LEAF_CACHE_PARAMS:
            # EAX[31:26]: cores per package - 1. One package, `count` cores.
            e["eax"] = (e["eax"] & 0x03FF_FFFF) | ((max(count, 1) - 1) << 26)
        elif fn == KVM_CPUID_SIGNATURE:
            e["eax"] = KVM_CPUID_FEATURES
            e["ebx"] = int.from_bytes(KVM_SIGNATURE[0:4], "little")
            e["ecx"] = int.from_bytes(KVM_SIGNATURE[4:8], "little")
            e["edx"] = int.from_bytes(KVM_SIGNATURE[8:12], "little")
    return entries
