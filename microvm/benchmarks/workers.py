"""Benchmark workers in processes of their own, reporting back over a queue.

Spawned, not forked: a fork of a process with vCPU and I/O threads would copy
a VMM in an undefined state. Each worker calls `report("progress", text)` as
it goes and returns its result; an exception in a worker becomes an error in
the parent naming the worker and carrying its traceback.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from microvm.errors import MicroVMError

Report = Callable[[str, Any], None]


class WorkerError(MicroVMError):
    """A benchmark worker process failed or went silent."""


def _entry(target: Callable[..., Any], index: int, messages: Any, args: tuple[Any, ...]) -> None:
    def report(kind: str, payload: Any) -> None:
        messages.put((index, kind, payload))

    try:
        report("result", target(report, *args))
    except BaseException:
        report("error", traceback.format_exc())


def run_workers(target: Callable[..., Any], args: Sequence[tuple[Any, ...]], *,
                on_progress: Callable[[str], None] | None = None, timeout: float = 1800,
                shared: Callable[[Any], tuple[Any, ...]] | None = None) -> list[Any]:
    """Run target(report, *shared(ctx), *args[i]) in len(args) spawned processes
    at once; return their results in order. shared(ctx) makes objects every
    worker gets (a Barrier, a Value), created from the spawn context."""
    ctx = multiprocessing.get_context("spawn")
    messages = ctx.Queue()
    common = shared(ctx) if shared is not None else ()
    procs = [ctx.Process(target=_entry, args=(target, i, messages, (*common, *a)), daemon=True)
             for i, a in enumerate(args)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < len(procs):
            try:
                index, kind, payload = messages.get(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if i not in results and not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    raise WorkerError(f"benchmark worker {dead[0] if dead else '?'} "
                                      f"{'died' if dead else 'timed out'} without a result") from None
                continue
            if kind == "error":
                raise WorkerError(f"benchmark worker {index} failed:\n{payload}")
            if kind == "result":
                results[index] = payload
            elif on_progress is not None:
                on_progress(str(payload))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[i] for i in range(len(procs))]
