"""VMs per second: create, boot, run `true`, tear down, again.

Serially in this process, then with `workers` processes at once (each boots
its share of the VMs one after another). Every worker first boots one VM that
is not counted (imports, the cached initramfs) and waits at a barrier, so the
clock runs only over the measured VMs: from the first worker's start to the
last worker's end (CLOCK_MONOTONIC is one clock for all processes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from microvm.benchmarks.guest import RunFailed
from microvm.benchmarks.report import summarize
from microvm.benchmarks.workers import Report, run_workers


def one_vm(kernel: Path, mem_mib: int, timeout: float = 300) -> float:
    """Seconds for one whole VM life: construct, boot, `true`, tear down."""
    from microvm.machine import MicroVM

    t0 = time.monotonic()
    r = MicroVM(kernel, mem_mib=mem_mib).run(["true"], timeout=timeout)
    if r.exit_code != 0:
        raise RunFailed(f"`true` exited {r.exit_code} in the guest")
    return time.monotonic() - t0


def _series(kernel: Path, mem_mib: int, count: int, step: Callable[[], None]) -> dict[str, Any]:
    from microvm import teardown

    start = time.monotonic()
    durations = []
    for _ in range(count):
        durations.append(one_vm(kernel, mem_mib))
        step()
    teardown.drain()  # the kernel's destruction of the last VMs (off run()'s path) counts in the rate too
    return {"start": start, "end": time.monotonic(), "durations": durations}


def _worker(report: Report, ready: Any, kernel: Path, mem_mib: int, count: int) -> dict[str, Any]:
    one_vm(kernel, mem_mib)  # warm-up, not counted
    ready.wait(600)
    return _series(kernel, mem_mib, count, lambda: report("progress", "VM done"))


def shares(count: int, workers: int) -> list[int]:
    """count split over workers as evenly as it goes."""
    return [count // workers + (i < count % workers) for i in range(workers)]


def summary(mode: str, workers: int, series: Sequence[dict[str, Any]]) -> dict[str, Any]:
    durations = [d for s in series for d in s["durations"]]
    elapsed = max(s["end"] for s in series) - min(s["start"] for s in series)
    return {"mode": mode, "workers": workers, "vms": len(durations), "seconds": elapsed,
            "vms_per_second": len(durations) / elapsed, "per_vm": summarize(durations).to_dict(),
            "durations": durations}


def run(kernel: Path, mem_mib: int = 128, count: int = 20, workers: int = 2,
        advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    one_vm(kernel, mem_mib)  # warm-up, not counted
    serial = _series(kernel, mem_mib, count, lambda: advance("serial"))
    results = [summary("serial", 1, [serial])]
    if workers > 1:
        parallel = run_workers(_worker, [(kernel, mem_mib, n) for n in shares(count, workers)],
                               on_progress=lambda _: advance(f"{workers} workers"),
                               shared=lambda ctx: (ctx.Barrier(workers),))
        results.append(summary("processes", workers, parallel))
    return {"benchmark": "rate", "kernel": str(kernel), "mem_mib": mem_mib, "results": results}


COLUMNS = ("mode", "workers", "VMs", "seconds", "VMs/s", "median ms/VM", "p90 ms/VM")


def table_rows(result: dict[str, Any]) -> list[Sequence[Any]]:
    return [[r["mode"], r["workers"], r["vms"], r["seconds"], r["vms_per_second"], r["per_vm"]["median"] * 1e3,
             r["per_vm"]["p90"] * 1e3] for r in result["results"]]
