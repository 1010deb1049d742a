"""`microvm doctor`: what this host's KVM can do, and what kind of KVM it is.

Hardware KVM runs guest kernel mode (CPL0) and user mode (CPL3) natively.
PVM (the kvm_pvm module) runs CPL3 natively but emulates CPL0 one
instruction at a time, about 3000x slower, so an unmodified Linux kernel
cannot run. We tell them apart by measuring: the same `dec; jnz` loop at
CPL0 and at CPL3 in a throw-away VM. The presence of kvm_pvm is only a hint.
"""

from __future__ import annotations

import enum
import functools
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from microvm import _kvm
from microvm.arch.x86_64 import flat
from microvm.errors import KvmError, UnsupportedHostError
from microvm.kvm import KVM_PATH, REQUIRED_CAPS, capabilities, open_kvm
from microvm.memory import GuestMemory


class Verdict(enum.StrEnum):
    HARDWARE = "hardware virtualization"
    PVM = "PVM (guest kernel mode is emulated, unmodified Linux guests cannot run here)"
    NO_KVM = "no KVM"


# Kernel mode slower than this per loop iteration is emulated, not executed:
# native loops cost well under 5 ns even nested; PVM's emulator ~1000 ns.
EMULATED_NS = 50.0
# ... and that much slower than user mode. (Under full software emulation,
# as in a TCG lane, both modes are equally slow: that is not PVM.)
EMULATED_RATIO = 20.0


def verdict(kvm_ok: bool, cpl0_ns: float | None, cpl3_ns: float | None) -> Verdict:
    """Classify a host from its loop timings (ns per iteration)."""
    if not kvm_ok or cpl0_ns is None or cpl3_ns is None:
        return Verdict.NO_KVM
    if cpl0_ns > EMULATED_NS and cpl0_ns > EMULATED_RATIO * max(cpl3_ns, 0.01):
        return Verdict.PVM
    return Verdict.HARDWARE


# The probe guest: out 0x80 (start); loop rcx times; out 0x81 (end).
#   e6 80                 out 0x80, al
#   48 8b cf              mov rcx, rdi
#   48 ff c9        loop: dec rcx
#   75 fb                 jnz loop
#   e6 81                 out 0x81, al
#   eb f2                 jmp start   (never reached: the host stops at 0x81)
PROBE_CODE = bytes.fromhex("e680488bcf48ffc975fbe681ebf2")


def _time_loop(fd: _kvm.VcpuFd, gdt_limit: int, user: bool, iterations: int) -> float:
    """Seconds between the start and end exits of one probe run."""
    flat.enter(fd, gdt_limit, user=user, rdi=iterations)
    t0 = None
    for _ in range(8):
        ex = fd.run()
        if isinstance(ex, _kvm.IoOut) and ex.port == 0x80:
            t0 = time.perf_counter()
        elif isinstance(ex, _kvm.IoOut) and ex.port == 0x81 and t0 is not None:
            return time.perf_counter() - t0
        elif not isinstance(ex, _kvm.Intr):
            raise KvmError(f"probe guest stopped unexpectedly: {ex!r}")
    raise KvmError("probe guest did not finish")


def measure_loop_ns(kvm: _kvm.Kvm, user: bool, iterations: int, repeat: int = 3) -> float:
    """Median ns per `dec; jnz` iteration at CPL3 (user) or CPL0."""
    import statistics  # here: `microvm run` imports this module, and needs this only once per host boot

    vm = kvm.create_vm()
    mem = GuestMemory.anonymous([(0, flat.RAM)])
    try:
        region = mem.regions[0]
        vm.set_user_memory_region(0, 0, region.size, region.host_address())
        mem.write(flat.CODE, PROBE_CODE)
        limit = flat.prepare(mem, user=user)
        fd = vm.create_vcpu(0)
        try:
            base = statistics.median(_time_loop(fd, limit, user, 1) for _ in range(repeat))
            full = statistics.median(_time_loop(fd, limit, user, iterations) for _ in range(repeat))
        finally:
            fd.close()
    finally:
        vm.close()
        mem.close()
    return max(full - base, 0.0) * 1e9 / iterations


@dataclass
class Report:
    path: str
    verdict: str
    api_version: int | None = None
    capabilities: dict[str, int] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    max_vcpus: int | None = None
    recommended_vcpus: int | None = None
    pvm_module: bool = False
    cpl0_ns_per_iter: float | None = None
    cpl3_ns_per_iter: float | None = None
    host: str = field(default_factory=lambda: " ".join(os.uname()[i] for i in (0, 2, 4)))
    error: str | None = None

    @property
    def kind(self) -> str:
        """Short verdict for scripts: "hardware", "pvm" or "no_kvm"."""
        return Verdict(self.verdict).name.lower()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


def diagnose(path: str = KVM_PATH) -> Report:
    pvm_module = os.path.exists("/sys/module/kvm_pvm")
    try:
        kvm = open_kvm(path, require=())
    except KvmError as e:
        return Report(path, Verdict.NO_KVM.value, pvm_module=pvm_module, error=str(e))
    with kvm:
        caps = capabilities(kvm)
        report = Report(
            path,
            Verdict.NO_KVM.value,
            api_version=kvm.get_api_version(),
            capabilities=caps,
            missing=[c for c in REQUIRED_CAPS if not caps.get(c)],
            max_vcpus=caps["KVM_CAP_MAX_VCPUS"] or caps["KVM_CAP_NR_VCPUS"],
            recommended_vcpus=caps["KVM_CAP_NR_VCPUS"],
            pvm_module=pvm_module,
        )
        try:
            # 20k CPL0 iterations: ~25 ms where emulated, microseconds where not.
            report.cpl0_ns_per_iter = measure_loop_ns(kvm, user=False, iterations=20_000)
            # 1M CPL3 iterations: ~0.4 ms native, ~0.1 s under full emulation (TCG lane).
            report.cpl3_ns_per_iter = measure_loop_ns(kvm, user=True, iterations=1_000_000)
        except (OSError, KvmError) as e:
            report.error = f"measurement failed: {e}"
            return report
    report.verdict = verdict(True, report.cpl0_ns_per_iter, report.cpl3_ns_per_iter).value
    return report


def render(report: Report) -> str:
    lines = [f"KVM device:      {report.path}"]
    if report.api_version is not None:
        lines.append(f"API version:     {report.api_version}")
        lines.append(f"max vCPUs:       {report.max_vcpus} (recommended {report.recommended_vcpus})")
        for name in REQUIRED_CAPS:
            lines.append(f"  {name:<28} {'yes' if report.capabilities.get(name) else 'MISSING'}")
    if report.cpl0_ns_per_iter is not None and report.cpl3_ns_per_iter is not None:
        lines.append(f"kernel-mode loop: {report.cpl0_ns_per_iter:10.2f} ns/iteration (CPL0)")
        lines.append(f"user-mode loop:   {report.cpl3_ns_per_iter:10.2f} ns/iteration (CPL3)")
    lines.append(f"kvm_pvm module:  {'loaded' if report.pvm_module else 'no'}")
    if report.error:
        lines.append(f"problem:         {report.error}")
    lines.append(f"verdict:         {report.verdict}")
    return "\n".join(lines)


def _verdict_cache() -> Path | None:
    """Where the verdict for this host boot is kept: it cannot change until reboot."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    base = Path(os.environ.get("MICROVM_CACHE") or Path.home() / ".cache" / "microvm")
    return base / "doctor" / f"verdict-{boot_id}-{os.uname().release}"


def plainly_hardware(pvm_module: str = "/sys/module/kvm_pvm", cpuinfo: str = "/proc/cpuinfo") -> bool:
    """No PVM module and the CPU advertises VMX or SVM: hardware virtualization,
    with no need to measure (the measurement is for the doubtful cases)."""
    if os.path.exists(pvm_module):
        return False
    try:
        flags = next((line for line in Path(cpuinfo).read_text().splitlines()
                      if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "vmx" in flags or "svm" in flags


@functools.cache
def plainly_hardware_here() -> bool:
    """plainly_hardware() for this host, read once per process: every VM's
    start asks (check_host), and /proc/cpuinfo is generated on each read (a
    large text on a many-core host; 1 ms a VM in the lane)."""
    return plainly_hardware()


@functools.cache
def host_verdict() -> Verdict:
    """This host's verdict: measured once per host boot (cached by boot id)."""
    cache = _verdict_cache()
    if cache is not None:
        try:
            return Verdict(cache.read_text())
        except (OSError, ValueError):
            pass
    report = diagnose()
    verdict = Verdict(report.verdict)
    if cache is not None and report.error is None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(verdict.value)
        except OSError:
            pass  # a read-only home only costs a measurement per process
    return verdict


def check_host(force: bool = False) -> None:
    """Refuse at once where an ordinary Linux guest cannot run (PVM)."""
    if force or os.environ.get("MICROVM_FORCE") == "1":
        return
    if not plainly_hardware_here() and host_verdict() is Verdict.PVM:
        raise UnsupportedHostError(
            "this host's /dev/kvm is PVM, not hardware virtualization: guest kernel mode is "
            "emulated and an unmodified Linux kernel cannot run here (it needs minutes, then fails). "
            "Use a PVM-enabled guest kernel with --force, or run inside the hardware-virtualization "
            "lane: tests/hwvirt/run microvm run -- CMD"
        )
