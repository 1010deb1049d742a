"""Host memory the VMM costs beyond the guest's own pages.

Method. psutil reads /proc/PID/smaps (Process.memory_maps(grouped=False)):
one entry per mapping with its address range, RSS (pages resident) and PSS
(each resident page divided by the number of processes sharing it, so shared
libraries are not counted in full by every process). Guest RAM is a set of
anonymous mappings whose host addresses the VM knows
(MicroVM.vm.mem.regions); the mappings that lie inside them are guest pages
(what the guest touched, plus the kernel and initramfs the loader wrote),
everything else is the VMM: the interpreter, its heap, thread stacks, the
vCPUs' kvm_run pages. So VMM = whole process - guest mappings, for RSS and
PSS alike. Kernel memory KVM allocates (its page tables, vCPU state) is no
part of any process's RSS and not counted here.

Measured with every guest booted and idle in a `sleep` (its init done):
  - one process: no VM (the baseline), 1 VM, then `count` VMs; the cost of one
    more VM is (VMM with count VMs - VMM with 1) / (count - 1);
  - a process per VM (`processes` of them, alive at once, so PSS shares the
    interpreter's pages between them): each process's VMM share.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from microvm.benchmarks.workers import Report, run_workers
from microvm.errors import MicroVMError

IDLE_COMMAND = ["sleep", "100000"]
MIB = 1 << 20


@dataclass(frozen=True)
class Usage:
    """Bytes resident in one process, split into guest RAM and the rest."""

    rss: int
    pss: int
    guest_rss: int
    guest_pss: int
    straddling: int = 0  # mappings only partly inside guest RAM (counted as VMM)

    @property
    def vmm_rss(self) -> int:
        return self.rss - self.guest_rss

    @property
    def vmm_pss(self) -> int:
        return self.pss - self.guest_pss

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "vmm_rss": self.vmm_rss, "vmm_pss": self.vmm_pss}


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with touching or overlapping [start, end) ranges joined (the
    kernel may merge neighbouring guest mappings into one)."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def split_usage(maps: Iterable[Any], guest: Iterable[tuple[int, int]]) -> Usage:
    """Sum smaps entries (objects with .addr 'start-end', .rss, .pss) into a
    Usage: an entry wholly inside a guest range is guest memory."""
    ranges = merge_ranges(guest)
    rss = pss = grss = gpss = straddling = 0
    for m in maps:
        start, end = (int(x, 16) for x in m.addr.split("-"))
        rss += m.rss
        pss += m.pss
        inside = any(lo <= start and end <= hi for lo, hi in ranges)
        if inside:
            grss += m.rss
            gpss += m.pss
        elif any(start < hi and lo < end for lo, hi in ranges):
            straddling += 1
    return Usage(rss, pss, grss, gpss, straddling)


def measure(guest: Iterable[tuple[int, int]] = ()) -> Usage:
    return split_usage(psutil.Process().memory_maps(grouped=False), guest)


def guest_ranges(vms: Iterable[Any]) -> list[tuple[int, int]]:
    """Host address ranges of the guest RAM of running MicroVMs."""
    return [(r.host_address(), r.host_address() + r.size) for vm in vms for r in vm.vm.mem.regions]


def start_idle(kernel: Path, mem_mib: int, timeout: float = 300) -> Any:
    """A MicroVM booted up to its command (an endless sleep)."""
    from microvm.machine import MicroVM

    vm = MicroVM(kernel, mem_mib=mem_mib).start(IDLE_COMMAND)
    deadline = time.monotonic() + timeout
    while "command started" not in vm.timeline():
        if vm.reason is not None or time.monotonic() > deadline:
            vm.kill()
            raise MicroVMError(f"guest did not reach its command in {timeout:.0f} s\n{vm.console_tail()}")
        time.sleep(0.02)
    return vm


def in_one_process(kernel: Path, mem_mib: int, count: int, advance: Callable[[str], None]) -> dict[str, Any]:
    from microvm.machine import MicroVM

    MicroVM(kernel, mem_mib=mem_mib).run(["true"], timeout=300)  # warm-up: imports, cached initramfs
    gc.collect()
    baseline = measure()
    vms: list[Any] = []
    try:
        vms.append(start_idle(kernel, mem_mib))
        advance("VM 1 in this process")
        one = measure(guest_ranges(vms))
        while len(vms) < count:
            vms.append(start_idle(kernel, mem_mib))
            advance(f"VM {len(vms)} in this process")
        many = measure(guest_ranges(vms))
    finally:
        for vm in vms:
            vm.kill()
    return {"baseline": baseline.to_dict(), "one": one.to_dict(), "many": many.to_dict(),
            "first_vm_vmm_rss": one.vmm_rss - baseline.vmm_rss,
            "first_vm_vmm_pss": one.vmm_pss - baseline.vmm_pss,
            "per_extra_vm_vmm_rss": (many.vmm_rss - one.vmm_rss) / max(count - 1, 1),
            "per_extra_vm_vmm_pss": (many.vmm_pss - one.vmm_pss) / max(count - 1, 1)}


def _process_worker(report: Report, booted: Any, measured: Any, kernel: Path, mem_mib: int) -> dict[str, int]:
    vm = start_idle(kernel, mem_mib)
    try:
        report("progress", "VM in its own process")
        booted.wait(600)  # all VMs alive at once: PSS splits the pages they share
        usage = measure(guest_ranges([vm]))
        measured.wait(600)  # nobody leaves before everybody measured
    finally:
        vm.kill()
    return usage.to_dict()


def per_process(kernel: Path, mem_mib: int, processes: int, advance: Callable[[str], None]) -> list[dict[str, int]]:
    return run_workers(_process_worker, [(kernel, mem_mib)] * processes, on_progress=advance,
                       shared=lambda ctx: (ctx.Barrier(processes), ctx.Barrier(processes)))


def run(kernel: Path, mem_mib: int = 128, count: int = 20, processes: int = 4,
        advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    if count < 2 or processes < 0:
        raise MicroVMError("footprint needs --count of at least 2 and --processes of at least 0")
    own = in_one_process(kernel, mem_mib, count, advance)
    procs = per_process(kernel, mem_mib, processes, advance) if processes else []
    return {"benchmark": "footprint", "kernel": str(kernel), "mem_mib": mem_mib, "count": count,
            "processes": processes, "one_process": own, "per_process": procs,
            "per_process_mean_vmm_rss": sum(p["vmm_rss"] for p in procs) / len(procs) if procs else None,
            "per_process_mean_vmm_pss": sum(p["vmm_pss"] for p in procs) / len(procs) if procs else None}


def table_rows(result: dict[str, Any]) -> list[Sequence[Any]]:
    """Rows for report.rows_table, in MiB."""
    own, n = result["one_process"], result["count"]

    def mib(x: float) -> float:
        return x / MIB

    def usage_row(name: str, vms: int, u: dict[str, int]) -> list[Any]:
        return [name, vms, mib(u["rss"]), mib(u["pss"]), mib(u["guest_rss"]), mib(u["vmm_rss"]), mib(u["vmm_pss"])]

    rows: list[Sequence[Any]] = [usage_row("one process, no VM (baseline)", 0, own["baseline"]),
            usage_row("one process, 1 VM", 1, own["one"]),
            usage_row(f"one process, {n} VMs", n, own["many"]),
            ["first VM over baseline", 1, None, None, None, mib(own["first_vm_vmm_rss"]),
             mib(own["first_vm_vmm_pss"])],
            [f"each extra VM ({n} vs 1)", 1, None, None, None, mib(own["per_extra_vm_vmm_rss"]),
             mib(own["per_extra_vm_vmm_pss"])]]
    for i, u in enumerate(result["per_process"]):
        rows.append(usage_row(f"own process per VM, #{i + 1}", 1, u))
    if result["per_process"]:
        rows.append([f"own process per VM, mean of {result['processes']}", 1, None, None, None,
                     mib(result["per_process_mean_vmm_rss"]), mib(result["per_process_mean_vmm_pss"])])
    return rows


COLUMNS = ("case", "VMs", "RSS MiB", "PSS MiB", "guest RSS MiB", "VMM RSS MiB", "VMM PSS MiB")
