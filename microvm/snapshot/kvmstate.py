"""A VM's state inside KVM: every vCPU's registers, the irqchip, PIT and clock.

Captured only while every vCPU is out of KVM_RUN (Vm.pause), and applied to
a VM whose vCPUs have never run. The result is plain data (ints, bytes,
dicts), ready for the state file.

The order follows what KVM needs (Documentation/virt/kvm/api.rst): CPUID
before the MSRs that depend on it; sregs (which carry the APIC base) before
the LAPIC; the TSC before its deadline; vCPU events (pending exceptions and
NMIs) last, so that nothing set afterwards clears them. The MSRs are every
one KVM lists (KVM_GET_MSR_INDEX_LIST) that this vCPU can read, not a
hand-picked few.
"""

from __future__ import annotations

from typing import Any

from microvm import _kvm
from microvm.arch.x86_64 import cpuid
from microvm.errors import SnapshotError

# The irqchip's three parts (KVM_GET_IRQCHIP chip_id): master PIC, slave PIC, I/O APIC.
IRQCHIPS = (0, 1, 2)
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0

# Readable MSRs, per KVM index list (the same for every vCPU with the same CPUID).
_readable: dict[tuple[object, ...], list[int]] = {}


def readable_msrs(kvm: _kvm.Kvm, vcpu: _kvm.VcpuFd) -> list[int]:
    """The MSRs from KVM's index list that this vCPU reads: KVM_GET_MSRS stops at
    the first it cannot (one the CPUID does not give the guest), so probe once."""
    listed = tuple(kvm.get_msr_index_list())
    # Which MSRs a vCPU reads depends on the CPUID it was given, too.
    key = listed + tuple(tuple(sorted(e.items())) for e in vcpu.get_cpuid2())
    found = _readable.get(key)
    if found is None:
        found = []
        try:
            vcpu.get_msrs(listed)
            found = list(listed)
        except OSError:
            for index in listed:
                try:
                    vcpu.get_msrs([index])
                except OSError:
                    continue
                found.append(index)
        # The TSC first and its deadline last: KVM_SET_MSRS sets them in order.
        found.sort(key=lambda i: (i == MSR_IA32_TSC_DEADLINE, i != MSR_IA32_TSC, i))
        _readable[key] = found
    return found


def capture_vcpu(kvm: _kvm.Kvm, vcpu: _kvm.VcpuFd) -> dict[str, Any]:
    return {
        "cpuid": vcpu.get_cpuid2(),
        "mp_state": vcpu.get_mp_state(),
        "regs": vcpu.get_regs(),
        "sregs": vcpu.get_sregs(),
        "fpu": vcpu.get_fpu(),
        "xsave": vcpu.get_xsave(),
        "xcrs": vcpu.get_xcrs(),
        "debugregs": vcpu.get_debugregs(),
        "lapic": vcpu.get_lapic(),
        "msrs": vcpu.get_msrs(readable_msrs(kvm, vcpu)),
        "events": vcpu.get_vcpu_events(),
    }


# The order KVM needs (see the module docstring); MSRs are set apart.
_VCPU_SETTERS = [("cpuid", "set_cpuid2"), ("mp_state", "set_mp_state"), ("regs", "set_regs"),
                 ("sregs", "set_sregs"), ("fpu", "set_fpu"), ("xsave", "set_xsave"), ("xcrs", "set_xcrs"),
                 ("debugregs", "set_debugregs"), ("lapic", "set_lapic"), ("msrs", None),
                 ("events", "set_vcpu_events")]


def apply_vcpu(vcpu: _kvm.VcpuFd, state: dict[str, Any], index: int) -> None:
    step = ""
    try:
        for step, setter in _VCPU_SETTERS:
            value = state[step]
            if setter is None:
                _apply_msrs(vcpu, value, index)
            elif value or step not in ("cpuid", "xcrs"):  # none given: leave KVM's
                getattr(vcpu, setter)(value)
    except KeyError as e:
        raise SnapshotError(f"vcpu{index}: the state has no {e.args[0]!r}") from e
    except (OSError, ValueError, TypeError) as e:
        raise SnapshotError(f"vcpu{index}: KVM refused the saved {step}: {e}") from e


def _apply_msrs(vcpu: _kvm.VcpuFd, msrs: dict[int, int], index: int) -> None:
    done = vcpu.set_msrs(msrs)
    if done != len(msrs):
        bad = list(msrs)[done]
        raise SnapshotError(f"vcpu{index}: this host's KVM refuses MSR {bad:#x} "
                            f"(set {done} of {len(msrs)}): a different CPU or KVM than the snapshot's")


def capture_vm(vm_fd: _kvm.VmFd, irqchip: bool) -> dict[str, Any]:
    state: dict[str, Any] = {"clock": vm_fd.get_clock()["clock"]}
    if irqchip:
        state["irqchip"] = [vm_fd.get_irqchip(chip) for chip in IRQCHIPS]
        state["pit"] = vm_fd.get_pit2()
    return state


def apply_vm(vm_fd: _kvm.VmFd, state: dict[str, Any], irqchip: bool) -> None:
    step = "clock"
    try:
        vm_fd.set_clock(state["clock"])
        if irqchip:
            step = "irqchip"
            for chip in state["irqchip"]:
                vm_fd.set_irqchip(chip)
            step = "pit"
            vm_fd.set_pit2(state["pit"])
    except KeyError as e:
        raise SnapshotError(f"the VM state has no {e.args[0]!r}") from e
    except (OSError, ValueError, TypeError) as e:
        raise SnapshotError(f"KVM refused the saved {step}: {e}") from e


# Leaves whose registers are feature bits (CPUID.1, CPUID.7.0/1, CPUID.0xD.1, extended 0x80000001).
FEATURE_LEAVES = {(1, 0): ("ecx", "edx"), (7, 0): ("ebx", "ecx", "edx"), (7, 1): ("eax",),
                  (0xD, 1): ("eax",), (0x80000001, 0): ("ecx", "edx")}
# Bits that mirror the guest's own settings, not the CPU's: OSXSAVE (CR4), APIC (its enable bit).
GUEST_SET_BITS = {(1, 0, "ecx"): 1 << 27, (1, 0, "edx"): 1 << 9}
# What this host gives a guest of N vCPUs, by (function, index): the host's CPU
# and KVM do not change while we run, so it is made once per vCPU count.
_offered: dict[int, dict[tuple[int, int], dict[str, int]]] = {}


def _host_cpuid(kvm: _kvm.Kvm, vcpus: int) -> dict[tuple[int, int], dict[str, int]]:
    host = _offered.get(vcpus)
    if host is None:
        tsc_deadline = bool(kvm.check_extension(_kvm.CAPS["KVM_CAP_TSC_DEADLINE_TIMER"]))
        entries = cpuid.vcpu_cpuid(kvm.get_supported_cpuid(), 0, vcpus, tsc_deadline)
        host = _offered[vcpus] = {(e["function"], e["index"]): e for e in entries}
    return host


def check_cpuid(kvm: _kvm.Kvm, saved: list[dict[str, int]], vcpus: int) -> None:
    """Every feature bit the guest was given must be one this host would give
    it (KVM's supported list, as arch/x86_64/cpuid.py adjusts it), else the
    guest would execute instructions this CPU lacks."""
    host = _host_cpuid(kvm, vcpus)
    for e in saved:
        key = (e["function"], e["index"])
        regs = FEATURE_LEAVES.get(key)
        if regs is None:
            continue
        for reg in regs:
            offered = host[key][reg] if key in host else 0
            missing = e[reg] & ~offered & ~GUEST_SET_BITS.get((*key, reg), 0)
            if missing:
                raise SnapshotError(
                    f"this host lacks CPUID features the guest was given: leaf {e['function']:#x}."
                    f"{e['index']} {reg} bits {missing:#x}")
