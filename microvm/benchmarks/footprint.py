"""Host memory the VMM costs beyond the guest's own pages.

Method. psutil gives the process's RSS and PSS (Process.memory_full_info(),
read from /proc/PID/smaps_rollup); PSS divides each resident page by the
number of processes sharing it, so shared libraries are not counted in full
by every process. Guest RAM is a set of anonymous mappings whose host
addresses the VM knows (MicroVM.vm.mem.regions); /proc/self/pagemap says
which of their pages are resident: what the guest touched, the initramfs the
loader wrote, and the kernel image's pages, mapped copy-on-write from one
memfd and shared by every guest of the process until written
(loader/kernelcache.py). A guest's own pages weigh the same in RSS and PSS.
A shared image page is in RSS once per guest that maps it, and in PSS once
(split between its mappings). So VMM RSS = RSS - guest pages with shared ones
counted per mapping, and VMM PSS = PSS - guest pages counted once. (Per-mapping smaps entries would not do: the kernel
merges a guest mapping with a neighbouring anonymous mapping of the same
flags, such as the next guest's.) Kernel memory KVM allocates (its page
tables, vCPU state) is no part of any process's RSS and not counted here.

Measured with every guest booted and idle in a `sleep` (its init done):
  - one process: no VM (the baseline), 1 VM, then `count` VMs; the cost of one
    more VM is (VMM with count VMs - VMM with 1) / (count - 1);
  - a process per VM (`processes` of them, alive at once, so PSS shares the
    interpreter's pages between them): each process's VMM share.
"""

from __future__ import annotations

import array
import ctypes
import gc
import mmap
import os
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
PAGE_SIZE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))


@dataclass(frozen=True)
class Usage:
    """Bytes resident in one process, and how many of them are guest RAM:
    `guest` counts each page once; `guest_mapped` counts a kernel image page
    as often as guests map it, as RSS does (PSS, like `guest`, counts it once)."""

    rss: int
    pss: int
    guest: int
    guest_mapped: int = -1  # -1: as `guest` (no page shared)

    @property
    def vmm_rss(self) -> int:
        return self.rss - (self.guest if self.guest_mapped < 0 else self.guest_mapped)

    @property
    def vmm_pss(self) -> int:
        return self.pss - self.guest

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "vmm_rss": self.vmm_rss, "vmm_pss": self.vmm_pss}


def resident_bytes(address: int, length: int) -> int:
    """Bytes of [address, address + length) resident in RAM (mincore(2);
    address page-aligned, as every mmap is)."""
    pages = -(-length // PAGE_SIZE)
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore({address:#x}, {length}): {os.strerror(err)}")
    return (pages - bytes(vec).count(0)) * PAGE_SIZE  # the kernel sets only bit 0


PM_PRESENT = 1 << 63  # Documentation/admin-guide/mm/pagemap.rst
PM_FILE_OR_SHARED = 1 << 61


def resident_split(address: int, length: int) -> tuple[int, int]:
    """(private, shared) bytes of [address, address + length) resident in RAM,
    from /proc/self/pagemap: a guest's own pages, and those still the kernel
    image's (loader/kernelcache.py: mapped copy-on-write from one memfd, the
    same pages in every guest of this process until one writes)."""
    pages = -(-length // PAGE_SIZE)
    entries = array.array("Q")
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE_SIZE * 8)
        entries.frombytes(f.read(pages * 8))
    private = shared = 0
    for e in entries:
        if e & PM_PRESENT:
            if e & PM_FILE_OR_SHARED:
                shared += PAGE_SIZE
            else:
                private += PAGE_SIZE
    return private, shared


def measure(guest: Iterable[tuple[int, int]] = ()) -> Usage:
    """The process's RSS and PSS, and its resident guest pages: each guest's
    own, plus the kernel image pages they share: once (their largest count),
    and as often as they are mapped (what RSS sees)."""
    info = psutil.Process().memory_full_info()
    split = [resident_split(start, end - start) for start, end in guest]
    private = sum(p for p, _ in split)
    return Usage(info.rss, info.pss, private + max((s for _, s in split), default=0),
                 private + sum(s for _, s in split))


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
        return [name, vms, mib(u["rss"]), mib(u["pss"]), mib(u["guest"]), mib(u["vmm_rss"]), mib(u["vmm_pss"])]

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


COLUMNS = ("case", "VMs", "RSS MiB", "PSS MiB", "guest MiB", "VMM RSS MiB", "VMM PSS MiB")
