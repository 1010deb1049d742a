"""Endurance: many VM lifecycles in one process, and many VMs at once, leave
nothing behind (fds, threads, guest-RAM mappings, the process's mappings, RSS).

Tiny PVH guests (tests/kvm/pvh.py): the whole MicroVM path, devices, vCPU and
I/O threads included, natively on any KVM host, in milliseconds a VM.

The bounds, stated: after the runs, fds, threads and guest-RAM mappings are
no more than they were (fewer, if something an earlier test left ends
meanwhile); the process's mappings (/proc/self/maps lines) within
MAPS_SLACK; what is allocated, not what is resident: malloc's bytes in use
(mallinfo2: in its arenas and in its own mmaps) within HEAP_SLACK and
Python's allocated blocks within BLOCKS_SLACK of where they stood after a
warm-up. A leak of 1 KiB or of one object a VM is past those bounds. RSS,
which also counts what malloc keeps of freed memory and moves with how
threads happened to spread over its arenas (rounds of 50 VMs at once: 67
to 88 MiB with the heap in use steady to 4 KiB), gets a coarse bound only.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import sys
import threading
import time

import psutil

from microvm import teardown
from microvm.machine import MicroVM
from tests.kvm.test_run_path import GUEST_MIB, resources, vm

LIFECYCLES = 1000
CONCURRENT = 50
MAPS_SLACK = 16
HEAP_SLACK = 256 << 10
BLOCKS_SLACK = CONCURRENT
RSS_SLACK_MIB = 24
RSS_NOISE_MIB = 48  # rounds of many VMs at once: see the test
ROUNDS = 6
WARMUP = 30


def baseline() -> tuple[int, int, tuple[int, int]]:
    """resources() once the threads of the VMs just ended are gone from the
    kernel's list too (a joined thread may linger there for a moment)."""
    deadline = time.monotonic() + 5
    while psutil.Process().num_threads() != threading.active_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    return resources()


def grown(before: tuple[int, int, tuple[int, int]]) -> list[str]:
    """What is up from `before` once the last VM's threads are gone (up to 5 s):
    fds, threads, guest-RAM mappings. Fewer is fine: a thread or fd an earlier
    test left may end meanwhile."""
    deadline = time.monotonic() + 5
    while True:
        fds, threads, (maps, ram) = resources()
        up = [f"{what} {a} -> {b}" for what, a, b in (("fds", before[0], fds), ("threads", before[1], threads),
                                                     ("guest mappings", before[2][0], maps),
                                                     ("guest RAM bytes", before[2][1], ram)) if b > a]
        if not up or time.monotonic() >= deadline:
            return up
        time.sleep(0.01)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL(None)
_libc.mallinfo2.restype = _Mallinfo2


@dataclasses.dataclass(frozen=True)
class Footprint:
    maps: int  # lines of /proc/self/maps
    heap: int  # bytes malloc has handed out and not had back, all arenas and its mmaps
    blocks: int  # Python's allocated memory blocks (sys.getallocatedblocks)
    rss_mib: float


def footprint() -> Footprint:
    """The process's footprint once pending VM teardowns are done and the
    garbage collector and malloc have handed back what they can. Anything
    left in reference cycles would count as in use until a full collection
    (a finished VM leaves none now: tests/kvm/test_run_path.py)."""
    assert teardown.drain(30.0)
    gc.collect()
    _libc.malloc_trim(0)
    info = _libc.mallinfo2()
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return Footprint(maps, info.uordblks + info.hblkhd, sys.getallocatedblocks(),
                     psutil.Process().memory_info().rss / (1 << 20))


def not_grown(first: Footprint, now: Footprint, *, rss_slack_mib: float) -> list[str]:
    """How `now` is past the bounds from `first`, in words (empty: it is not)."""
    checks = (("/proc/self/maps lines", first.maps, now.maps, MAPS_SLACK),
              ("malloc bytes in use", first.heap, now.heap, HEAP_SLACK),
              ("Python blocks", first.blocks, now.blocks, BLOCKS_SLACK),
              ("RSS MiB", first.rss_mib, now.rss_mib, rss_slack_mib))
    return [f"{what} {a:.1f} -> {b:.1f} (bound +{slack})" for what, a, b, slack in checks if b > a + slack]


def test_a_thousand_lifecycles_in_one_process() -> None:
    # Caches, malloc's arenas, thread stacks glibc keeps for reuse; and each of
    # the 7 kernels once (the loader keeps a parsed kernel's symbols and an fd
    # of its image: ~35 Python blocks a kernel, a bounded cache).
    for i in range(WARMUP):
        vm(status=i % 7).run(["true"], timeout=30)
    before, first = baseline(), footprint()
    for i in range(LIFECYCLES):
        r = vm(status=i % 7).run(["echo", str(i)], timeout=30)
        assert (r.exit_code, r.reason) == (i % 7, "exit")
    assert grown(before) == []
    assert not_grown(first, footprint(), rss_slack_mib=RSS_SLACK_MIB) == [], f"over {LIFECYCLES} VMs"


def fifty_at_once() -> None:
    vms: list[MicroVM] = [vm(20_000, status=n % 100) for n in range(CONCURRENT)]
    results: dict[int, tuple[int | None, str]] = {}

    def run(n: int) -> None:
        r = vms[n].run(["true"], timeout=120)
        results[n] = (r.exit_code, r.reason)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {n: (n % 100, "exit") for n in range(CONCURRENT)}


def test_fifty_vms_at_once_again_and_again() -> None:
    """Rounds of 50 VMs at once: the first round grows what that many threads
    make glibc keep (malloc arenas, cached thread stacks); later rounds must
    not grow what is in use. RSS moves round by round by up to 25 MiB either
    way (193.9 to 218.7 MiB in one CI run, medians 198.7 -> 214.9, with the
    heap in use steady), as the threads spread over malloc's arenas and
    fragment them differently each time, so it is held to a coarse bound: a
    lost guest RAM region, 32 MiB, is past it; it is counted among the guest
    mappings anyway."""
    fifty_at_once()
    before, first = baseline(), footprint()
    rounds = []
    for _ in range(ROUNDS):
        fifty_at_once()
        rounds.append(footprint())
    assert grown(before) == []
    assert not_grown(first, rounds[-1], rss_slack_mib=RSS_NOISE_MIB) == [], (
        f"over {ROUNDS} rounds of {CONCURRENT} VMs of {GUEST_MIB} MiB: {first} -> {rounds}")
