"""Snapshot, restore and fork of a tiny guest: `microvm bench restore`.

The guest (CPL3, long mode: native speed on any KVM, PVM included, so no
lane) loops on `out 0x80, al`. It is paused in that loop and snapshotted;
then, taking turns, each variant makes a VM in that state and runs it to
its first exit (the next `out`), timed from the call to that exit (the VMs
are paused and closed in batches between timings: on this kind of host a
VM's teardown keeps the kernel busy for milliseconds after close()):

    restore        Snapshot.load + restore_vm + start: nothing made in advance
    fork           snapshot.fork(parent, 1) + start
    fork (shell)   the same into a VM shell made beforehand (snapshot.shell)

and, apart, `snapshot` (snapshot.take to a new directory) and the host
memory (RSS, PSS) of the process with 1, 10 and 50 running clones.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from microvm import snapshot
from microvm.arch.x86_64 import flat
from microvm.benchmarks import report
from microvm.vm import Vm

LOOP = bytes.fromhex("e680ebfc")  # l: out 0x80, al; jmp l
PORT = 0x80
VARIANTS = ("restore", "fork", "fork (shell)")
CLONE_COUNTS = (1, 10, 50)
BATCH = 30  # VMs kept (paused) before they are closed together, outside the timings
SETTLE = 0.2  # seconds after a batch's teardown before the next timing
MIB = 1 << 20


class FirstExit:
    """The time of the first write to the port."""

    def __init__(self) -> None:
        self.at = 0
        self.seen = threading.Event()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if not self.at:
            self.at = time.perf_counter_ns()
            self.seen.set()


def parent(mem_mib: int) -> Vm:
    """The tiny guest, forkable, paused in its loop after its first exit."""
    vm = Vm([(0, mem_mib * MIB)], irqchip=True, forkable=True)
    try:
        vm.mem.write(flat.CODE, LOOP)
        limit = flat.prepare(vm.mem, map_gib=1, user=True)
        flat.enter(vm.vcpus[0].fd, limit, user=True)
        first = FirstExit()
        vm.pio.register(PORT, 1, first)
        vm.start()
        if not first.seen.wait(10):
            raise RuntimeError("the tiny guest never reached its first exit")
        vm.pause()
    except BaseException:
        vm.close()
        raise
    return vm


def _run_to_first_exit(vm: Vm, t0: int) -> float:
    first = FirstExit()
    vm.pio.register(PORT, 1, first)
    vm.start()
    if not first.seen.wait(10):
        raise RuntimeError("the restored guest never reached its first exit")
    return (first.at - t0) / 1e9


def _timed(make: Callable[[], Vm], done: list[Vm]) -> float:
    """make() -> running to its first exit, timed; the VM paused and kept in
    `done`, closed later in a batch: a VM's teardown (milliseconds of the
    host kernel's time) is not part of the next one's start."""
    t0 = time.perf_counter_ns()
    vm = make()
    try:
        seconds = _run_to_first_exit(vm, t0)
        vm.pause()
    except BaseException:
        vm.close()
        raise
    done.append(vm)
    return seconds


def time_restore(path: Path, done: list[Vm]) -> float:
    return _timed(lambda: snapshot.Snapshot.load(path).restore_vm(), done)


def time_fork(vm: Vm, done: list[Vm], shell: Vm | None = None) -> float:
    shells = [shell] if shell is not None else None
    return _timed(lambda: snapshot.fork(vm, 1, shells=shells)[0], done)


def _close_all(vms: list[Vm]) -> None:
    while vms:
        vms.pop().close()
    time.sleep(SETTLE)


def time_snapshot(vm: Vm, path: Path) -> float:
    t0 = time.perf_counter()
    snapshot.take(vm, path)
    return time.perf_counter() - t0


def clone_memory(vm: Vm, counts: tuple[int, ...] = CLONE_COUNTS) -> list[dict[str, float]]:
    """RSS and PSS growth of this process with N clones running (each past its first exit)."""
    me = psutil.Process()
    rows = []
    for n in counts:
        base = me.memory_full_info()
        clones = snapshot.fork(vm, n)
        try:
            for clone in clones:
                _run_to_first_exit(clone, time.perf_counter_ns())
            for clone in clones:
                clone.pause()
            now = me.memory_full_info()
            rows.append({"clones": n, "rss_mib": (now.rss - base.rss) / MIB, "pss_mib": (now.pss - base.pss) / MIB,
                         "pss_per_clone_mib": (now.pss - base.pss) / MIB / n})
        finally:
            for clone in clones:
                clone.close()
    return rows


def run(mem_mib: int, runs: int, advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    snapshots: list[float] = []
    tmp = Path(tempfile.mkdtemp(prefix="microvm-bench-restore-"))
    vm = parent(mem_mib)
    done: list[Vm] = []
    try:
        for i in range(3):
            snapshots.append(time_snapshot(vm, tmp / f"snap{i}"))
        path = tmp / "snap0"
        for _ in range(3):  # warm-up, not counted: imports, the MSR probe, the page cache
            time_restore(path, done)
            time_fork(vm, done)
        _close_all(done)
        for i in range(runs):
            shell = snapshot.shell(vm)  # made ahead, outside the timing
            for variant in VARIANTS:  # taking turns, so drift hits every variant alike
                if variant == "restore":
                    samples[variant].append(time_restore(path, done))
                elif variant == "fork":
                    samples[variant].append(time_fork(vm, done))
                else:
                    samples[variant].append(time_fork(vm, done, shell))
            advance(f"run {i + 1}: " + ", ".join(f"{v} {samples[v][-1] * 1e3:.2f} ms" for v in VARIANTS))
            if len(done) >= BATCH:
                _close_all(done)
        _close_all(done)
        memory = clone_memory(vm)
        advance("clones: " + ", ".join(f"{r['clones']}: {r['pss_mib']:.1f} MiB" for r in memory))
    finally:
        for v in done:
            v.close()
        vm.close()
        shutil.rmtree(tmp, ignore_errors=True)
    stats = {v: report.summarize(s).to_dict() for v, s in samples.items()}
    return {"benchmark": "restore", "mem_mib": mem_mib, "vcpus": 1, "runs": runs,
            "samples": samples, "stats": stats, "snapshot": report.summarize(snapshots).to_dict(),
            "snapshot_samples": snapshots, "clones": memory}


def steps(runs: int) -> int:
    return runs + 1


def tables(result: dict[str, Any]) -> list[Any]:
    groups = {f"tiny guest, {result['mem_mib']} MiB, 1 vCPU": {
        **{f"{v} -> first exit": report.Stats(**result["stats"][v]) for v in VARIANTS},
        "snapshot": report.Stats(**result["snapshot"])}}
    timing = report.stats_table("snapshot, restore and fork", groups)
    memory = report.rows_table("host memory of running clones (growth of this process)",
                               ["clones", "RSS MiB", "PSS MiB", "PSS per clone MiB"],
                               [(r["clones"], r["rss_mib"], r["pss_mib"], r["pss_per_clone_mib"])
                                for r in result["clones"]])
    return [timing, memory]
