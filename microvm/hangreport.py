"""What a guest that did not finish in time was doing: the text a GuestTimeoutError carries.

A timeout alone says nothing of why. Before the VM is killed, its vCPUs are
parked outside KVM_RUN (a register read waits for KVM_RUN to return) and we
write down, best effort (a part that cannot be read says so, and the rest
still comes):
- how far the boot got (the timeline's last mark);
- each vCPU: its exits (and those answered in C), where it is (RIP, named
  from an ELF kernel's symbol table when it is in the kernel; CPL),
  whether it takes interrupts (RFLAGS.IF), whether it is halted (mp_state),
  the interrupt KVM is injecting, its local APIC's requested (IRR) and
  in-service (ISR) vectors, and its APIC timer (KVM clears a TSC deadline
  when it injects the interrupt: one that passed a few ms ago was due while
  the vCPU was being parked, one that passed seconds ago is a timer
  interrupt never delivered);
- the UART: its interrupt enables, a THRE interrupt waiting to be taken,
  unread input;
- each virtio device: its interrupt line as the I/O APIC has it (vector,
  masked, the line's request bit), its InterruptStatus, its interrupts
  raised, and each live queue's avail index (the driver's), what we popped,
  and the used index we published.
Read together: a vCPU halted with IF=1 and no vector requested while a
device's InterruptStatus is raised is an interrupt lost on its way; a
queue whose avail index is ahead of what we popped is a notification we
never got; a vCPU in a loop of exits shows it in the count.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microvm.loader.symbols import functions_at

MP_STATES = {0: "runnable", 1: "uninitialized", 2: "INIT received", 3: "halted", 4: "SIPI received"}
IOAPIC_CHIP = 2  # KVM_IRQCHIP_IOAPIC
# struct kvm_irqchip: chip_id, pad, then struct kvm_ioapic_state: base_address (u64),
# ioregsel, id, irr, pad (u32 each), redirtbl[24] (u64 each).
_IOAPIC_IRR, _IOAPIC_REDIR = 8 + 16, 8 + 24
_APIC_ISR, _APIC_IRR = 0x100, 0x200  # the local APIC page: 8 x 32-bit registers, 16 bytes apart
_APIC_LVTT, _APIC_TMICT, _APIC_TMCCT = 0x320, 0x380, 0x390  # timer: LVT entry, initial and current count
MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE = 0x10, 0x6E0
TIMER_MODES = {0: "one-shot", 1: "periodic", 2: "TSC-deadline"}
RFLAGS_IF = 1 << 9


def _vectors(page: bytes, base: int) -> list[int]:
    """The vectors whose bits are set in the 256-bit APIC register at `base`."""
    found = []
    for i in range(8):
        word = int.from_bytes(page[base + 16 * i:base + 16 * i + 4], "little")
        found += [32 * i + b for b in range(32) if word >> b & 1]
    return found


def _reg(page: bytes, offset: int) -> int:
    return int.from_bytes(page[offset:offset + 4], "little")


def timer_text(fd: Any, lapic: bytes) -> str:
    """The vCPU's local APIC timer: its mode, and when it is due."""
    lvtt = _reg(lapic, _APIC_LVTT)
    mode = TIMER_MODES.get(lvtt >> 17 & 3, "mode 3")
    entry = f"vector {lvtt & 0xFF:#x}" + (" masked" if lvtt >> 16 & 1 else "")
    if mode != "TSC-deadline":
        return f"timer {mode}, count {_reg(lapic, _APIC_TMCCT)} of {_reg(lapic, _APIC_TMICT)} ({entry})"
    msrs = fd.get_msrs([MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE])
    deadline = msrs.get(MSR_IA32_TSC_DEADLINE, 0)
    if not deadline:
        return f"timer TSC-deadline, none set ({entry})"
    ms = (deadline - msrs[MSR_IA32_TSC]) / fd.get_tsc_khz()
    return f"timer TSC-deadline {f'due in {ms:.1f} ms' if ms >= 0 else f'passed {-ms:.1f} ms ago'} ({entry})"


def _hexes(values: list[int]) -> str:
    return "[" + " ".join(f"{v:#x}" for v in values) + "]"


def _part(lines: list[str], what: str, read: Callable[[], Iterable[str]]) -> None:
    """Append what read() says, or why it could not be read: never raises."""
    try:
        lines.extend(read())
    except Exception as e:  # a report must come whatever it cannot read
        lines.append(f"  {what}: unavailable ({e!r})")


def kernel_functions(kernel: Path | None, addrs: Iterable[int]) -> dict[int, str]:
    """Names of `addrs` in an ELF vmlinux ({} for a bzImage, or unreadable)."""
    if kernel is None:
        return {}
    try:
        return functions_at(kernel, addrs)  # a LoaderError for a bzImage
    except Exception:  # the report goes on without names
        return {}


@dataclass
class VcpuState:
    """One parked vCPU as read for the report (read first, named afterwards:
    reading symbols takes time, and a paused vCPU's timer runs on)."""

    index: int
    exits: int
    fast_exits: int
    mp_state: int
    regs: dict[str, int]
    cpl: int | str
    injecting: int | None
    lapic: bytes
    timer: str

    @classmethod
    def read(cls, index: int, vcpu: Any) -> VcpuState:
        fd = vcpu.fd
        regs, sregs, lapic, events = fd.get_regs(), fd.get_sregs(), fd.get_lapic(), fd.get_vcpu_events()
        injected, vector = events[8], events[9]  # struct kvm_vcpu_events: interrupt.injected, .nr
        cpl = sregs["cs"]["selector"] & 3 if isinstance(sregs.get("cs"), dict) else "?"
        return cls(index, fd.exits, getattr(fd, "fast_exits", 0), fd.get_mp_state(), regs, cpl,
                   vector if injected else None, lapic, timer_text(fd, lapic))

    def line(self, names: dict[int, str]) -> str:
        rip = self.regs["rip"]
        where = f"{rip:#x}" + (f" ({names[rip]})" if rip in names else "")
        return (f"  vcpu{self.index}: {self.exits} exits ({self.fast_exits} in C), "
                f"{MP_STATES.get(self.mp_state, 'mp_state ?')}, rip={where} cpl={self.cpl} "
                f"IF={int(bool(self.regs['rflags'] & RFLAGS_IF))}, injecting "
                f"{'nothing' if self.injecting is None else f'vector {self.injecting:#x}'}, "
                f"APIC IRR {_hexes(_vectors(self.lapic, _APIC_IRR))} ISR {_hexes(_vectors(self.lapic, _APIC_ISR))}, "
                f"{self.timer}")


def ioapic_pins(vm_fd: Any) -> dict[int, str]:
    """gsi -> how the I/O APIC has that pin."""
    chip = vm_fd.get_irqchip(IOAPIC_CHIP)
    irr = struct.unpack_from("<I", chip, _IOAPIC_IRR)[0]
    pins = {}
    for gsi in range(24):
        entry = struct.unpack_from("<Q", chip, _IOAPIC_REDIR + 8 * gsi)[0]
        pins[gsi] = (f"vector {entry & 0xFF:#x}{' masked' if entry >> 16 & 1 else ''}"
                     f"{' level' if entry >> 15 & 1 else ' edge'}{' remote-IRR' if entry >> 14 & 1 else ''}"
                     f"{' requested' if irr >> gsi & 1 else ''}")
    return pins


def device_lines(attached: Any, pins: dict[int, str]) -> list[str]:
    """One virtio device: its line, status, interrupt state and queues."""
    t = attached.transport
    line = f"  {attached.name}: gsi {attached.gsi} ({pins.get(attached.gsi, '?')}), status {t.status:#x}, " \
           f"InterruptStatus {t.isr.value:#x}, {t.counters.interrupts} interrupts raised"
    queues = []
    for i, q in enumerate(t.queues):
        if q.ready and q.mem is not None:
            queues.append(f"q{i} avail {q.avail_idx()} popped {q.next_avail & 0xFFFF} used {q.next_used & 0xFFFF}")
    return [line + (": " + "; ".join(queues) if queues else "")]


def state_lines(attached: Any, pins: dict[int, str]) -> list[str]:
    """A device that says its own state (report_state(), as the UART does)."""
    return [f"  {attached.name}: gsi {attached.gsi} ({pins.get(attached.gsi, '?')}), {attached.device.report_state()}"]


def report(vm: Any, attached: Iterable[Any], timeline: dict[str, float], kernel: Path | None = None) -> str:
    """The text: the VM's vCPUs should be parked first (vm.vcpus[i].pause())."""
    lines = [f"--- what the guest was doing (boot reached: {next(reversed(timeline), 'nothing')}) ---"]
    vcpus: list[VcpuState] = []

    def read_vcpu(i: int, vcpu: Any) -> list[str]:
        vcpus.append(VcpuState.read(i, vcpu))
        return []

    for i, vcpu in enumerate(vm.vcpus):
        _part(lines, f"vcpu{i}", functools.partial(read_vcpu, i, vcpu))
    pins: dict[int, str] = {}

    def read_pins() -> list[str]:
        pins.update(ioapic_pins(vm.fd))
        return []

    _part(lines, "I/O APIC", read_pins)
    devices: list[str] = []
    for a in attached:
        if a.transport is not None:
            _part(devices, a.name, functools.partial(device_lines, a, pins))
        elif callable(getattr(a.device, "report_state", None)):
            _part(devices, a.name, functools.partial(state_lines, a, pins))
    names = kernel_functions(kernel, [v.regs["rip"] for v in vcpus if v.cpl == 0])
    return "\n".join(lines + [v.line(names) for v in vcpus] + devices)
