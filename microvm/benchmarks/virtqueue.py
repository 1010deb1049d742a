"""Cost of a virtqueue request, device side: the Python queue against the Cython one.

No VM: a driver in this process (the same ring layout Linux uses, in a
bytearray) makes `chains` requests available, a batch at a time, and the
device side pops each chain, returns it (add_used_many, one index update
per batch) and asks whether to interrupt (needs_notification), as a device
does. Chains of one descriptor (a net transmit), two (a vsock packet) and
three (a block request: header, data, status), each through:

    python   queue.PyQueue, the reference
    cython   microvm._virtq.Queue, the default

taking turns, `runs` times. Reported: ns per chain (pop + used +
notification check), and the ratio python / cython.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

from microvm.benchmarks import report
from microvm.devices.virtio import queue as vq
from microvm.memory import GuestMemory

SIZE = 256  # the ring size virtio-net and virtio-blk use
BATCH = 32  # chains made available between two device passes
SHAPES = {"1 descriptor": 1, "2 descriptors": 2, "3 descriptors": 3}
VARIANTS = ("python", "cython")
DESC = struct.Struct("<QIHH")
F_NEXT, F_WRITE = 1, 2
RAM = 1 << 20
DESC_TABLE, AVAIL, USED, DATA = 0x1000, 0x3000, 0x4000, 0x10000


def _queue_class(variant: str) -> Callable[[int], Any]:
    if variant == "python":
        return vq.PyQueue
    from microvm._virtq import Queue

    return Queue


def per_chain_ns(variant: str, descriptors: int, chains: int) -> float:
    """ns per chain through one queue of `variant`, chains of `descriptors` each."""
    backing = bytearray(RAM)
    mem = GuestMemory([(0, backing)])
    # The descriptor table: SIZE / descriptors chains, each a linked run of descriptors.
    heads = list(range(0, SIZE - descriptors + 1, descriptors))
    for head in heads:
        for i in range(descriptors):
            flags = (F_NEXT if i < descriptors - 1 else 0) | (F_WRITE if i == descriptors - 1 else 0)
            DESC.pack_into(backing, DESC_TABLE + 16 * (head + i), DATA + 4096 * ((head + i) % 200), 512, flags,
                           head + i + 1)
    q = _queue_class(variant)(SIZE)
    q.size, q.desc_table, q.avail_ring, q.used_ring = SIZE, DESC_TABLE, AVAIL, USED
    q.ready = True
    q.activate(mem, True)
    avail_idx = 0
    done = 0
    t0 = time.perf_counter_ns()
    while done < chains:
        # The driver's part (not what is measured, but inside the timing for both alike).
        n = min(BATCH, chains - done)
        for i in range(n):
            struct.pack_into("<H", backing, AVAIL + 4 + 2 * ((avail_idx + i) % SIZE), heads[(done + i) % len(heads)])
        avail_idx = (avail_idx + n) & 0xFFFF
        struct.pack_into("<H", backing, AVAIL + 2, avail_idx)
        # The device's part.
        used = []
        while (chain := q.pop()) is not None:
            used.append((chain.head, 512))
        q.add_used_many(used)
        q.needs_notification()
        done += n
    dt = time.perf_counter_ns() - t0
    q.release()
    mem.close()
    return dt / chains


def run(chains: int, runs: int, advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {v: {shape: [] for shape in SHAPES} for v in VARIANTS}
    for variant in VARIANTS:  # warm-up, not counted
        per_chain_ns(variant, 1, 2000)
    for i in range(runs):
        for shape, descriptors in SHAPES.items():
            for variant in VARIANTS:  # taking turns, so drift hits both alike
                samples[variant][shape].append(per_chain_ns(variant, descriptors, chains))
                advance(f"run {i + 1} {shape} {variant}: {samples[variant][shape][-1]:.0f} ns")
    return {"benchmark": "virtqueue", "chains": chains,
            **report.compare(samples, list(SHAPES), [("python", "cython")])}


METRICS = {shape: (f"a chain of {shape}", "ns") for shape in SHAPES}


def title(result: dict[str, Any]) -> str:
    return f"virtqueue, device side: pop + used + notification check per chain ({result['chains']} chains per run)"
