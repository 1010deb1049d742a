"""The split virtqueue (virtio 1.2, 2.7) against a fake driver in plain memory: no KVM needed.

Whatever a driver writes into its rings, the queue answers with chains whose
buffers lie inside guest memory, or with a QueueError; it never raises
anything else and never writes outside the used ring.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
from collections.abc import Callable, Iterator
from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm.devices.virtio import net_abi, ring
from microvm.devices.virtio import queue as vq
from microvm.devices.virtio.queue import DescriptorChain, Queue, QueueError
from microvm.memory import GuestMemory
from tests.support.virtio_driver import (
    LAYOUTS,
    SIZES,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    HostileRing,
    Picker,
    RandomPicker,
    VirtqDriver,
    avail_ring_size,
    chain_bytes,
    hostile_ring,
    make_queue,
    mutate_ring,
    pack_desc,
    run_hostile,
    used_ring_size,
)

pytestmark = pytest.mark.usefixtures("virtqueue")  # every test here runs with both queues

# Rings in the low region, buffers in the high one, a hole between them.
LOW = (0x0, 0x10000)
HIGH = (0x20000, 0x10000)
HOLE = 0x18000
LOW_END, HIGH_END = LOW[0] + LOW[1], HIGH[0] + HIGH[1]


def guest_memory() -> GuestMemory:
    return GuestMemory([(LOW[0], bytearray(LOW[1])), (HIGH[0], bytearray(HIGH[1]))])


def setup(size: int = 8, event_idx: bool = False, start_idx: int = 0) -> tuple[GuestMemory, VirtqDriver, Queue]:
    mem = guest_memory()
    driver = VirtqDriver.create(mem, size, base=0x1000, data=(HIGH[0], HIGH_END), start_idx=start_idx)
    return mem, driver, make_queue(driver, event_idx)


def pop_chain(queue: Queue) -> DescriptorChain:
    chain = queue.pop()
    assert chain is not None
    return chain


# --- well-formed chains --------------------------------------------------------------


def test_chain_readable_then_writable() -> None:
    mem, driver, queue = setup()
    assert queue.pop() is None
    head = driver.add_chain([(b"header", False), (b"payload" * 3, False), (64, True), (1, True)])
    assert queue.has_available()
    chain = pop_chain(queue)
    assert chain.head == head
    assert [(d.addr, d.len, d.write) for d in chain.descriptors] == driver.buffers[head]
    assert chain_bytes(mem, chain) == [(b"header", False), (b"payload" * 3, False), (bytes(64), True), (b"\0", True)]
    assert [d.len for d in chain.readable] == [6, 21] and [d.len for d in chain.writable] == [64, 1]
    assert (chain.readable_len(), chain.writable_len()) == (27, 65)
    assert queue.pop() is None and not queue.has_available()


def test_chains_in_order_and_used_out_of_order() -> None:
    _, driver, queue = setup(size=8)
    heads = [driver.add_chain([(bytes([i]) * 4, False), (8, True)]) for i in range(2)]
    heads.append(driver.add_chain([(b"x", False)]))
    chains = [pop_chain(queue) for _ in heads]
    assert [c.head for c in chains] == heads
    assert queue.pop() is None
    for chain, length in ((chains[2], 0), (chains[0], 8), (chains[1], 3)):
        queue.add_used(chain.head, length)
    assert driver.used() == [(heads[2], 0), (heads[0], 8), (heads[1], 3)]
    assert sorted(driver.free) == list(range(8))


def test_indirect_chain() -> None:
    mem, driver, queue = setup()
    head = driver.add_indirect_chain([(b"request", False), (b"more", False), (512, True)])
    assert len(driver.free) == 7  # the whole chain costs one descriptor of the table
    chain = pop_chain(queue)
    assert chain.head == head
    assert [(d.addr, d.len, d.write) for d in chain.descriptors] == driver.buffers[head]
    assert chain_bytes(mem, chain) == [(b"request", False), (b"more", False), (bytes(512), True)]
    queue.add_used(head, 512)
    assert driver.used() == [(head, 512)]


def test_chain_as_long_as_the_queue() -> None:
    _, driver, queue = setup(size=4)
    driver.add_chain([(b"a", False), (b"b", False), (4, True), (4, True)])
    assert len(pop_chain(queue).descriptors) == 4


def test_zero_length_and_edge_buffers() -> None:
    _, driver, queue = setup(size=4)
    driver.write_desc(0, LOW_END - 16, 16, VRING_DESC_F_NEXT, 1)  # ends exactly at the region's end
    driver.write_desc(1, HIGH[0], 0, VRING_DESC_F_NEXT, 2)
    driver.write_desc(2, HIGH_END - 1, 1, VRING_DESC_F_WRITE)
    driver.offer(0)
    # The empty buffer is followed, not handed out: a device never sees it.
    assert [(d.addr, d.len) for d in pop_chain(queue).descriptors] == [(LOW_END - 16, 16), (HIGH_END - 1, 1)]


def test_empty_buffer_may_point_anywhere() -> None:
    _, driver, queue = setup(size=4)
    driver.write_desc(0, 0xDEAD_0000_0000, 0, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1)
    driver.write_desc(1, HIGH[0], 8, VRING_DESC_F_WRITE)
    driver.offer(0)
    assert [(d.addr, d.len) for d in pop_chain(queue).descriptors] == [(HIGH[0], 8)]


def test_not_ready() -> None:
    _, driver, queue = setup()
    driver.add_chain([(b"x", False)])
    queue.ready = False
    with pytest.raises(QueueError, match="not ready"):
        queue.pop()


# --- the used ring: what the device writes (2.7.8) ----------------------------------------


@pytest.mark.parametrize("used", [
    [(8, 0)],  # head == queue size
    [(0xFFFF, 0)],
    [(-1, 0)],
    [(0, 1 << 32)],  # len is an le32
    [(0, -1)],
    [(0, 4), (1, 4), (8, 4)],  # the last of a batch: nothing of the batch is published
])
def test_add_used_refuses_out_of_range(used: list[tuple[int, int]]) -> None:
    _, driver, queue = setup(size=8)
    for _ in range(3):
        driver.add_chain([(4, True)])
        pop_chain(queue)
    with pytest.raises(QueueError, match="out of range"):
        if len(used) == 1:
            queue.add_used(*used[0])
        else:
            queue.add_used_many(used)
    assert driver.used_idx() == queue.next_used == 0 and queue.used_added == 0
    assert driver.used() == []
    queue.add_used_many([(0, 4), (7, 0xFFFF_FFFF)])  # the edges themselves are fine
    assert driver.used() == [(0, 4), (7, 0xFFFF_FFFF)]


def test_queue_counters() -> None:
    _, driver, queue = setup(size=4, start_idx=65534)
    heads = [driver.add_chain([(b"x", False)]) for _ in range(3)]
    chains = [pop_chain(queue) for _ in heads]
    queue.add_used(chains[0].head, 0)
    assert queue.needs_notification()
    queue.add_used_many([(c.head, 1) for c in chains[1:]])  # across the 65535 -> 0 wrap
    driver.set_no_interrupt(True)
    assert not queue.needs_notification()
    assert (queue.chains_popped, queue.used_added, queue.interrupts_suppressed) == (3, 3, 1)
    queue.reset()  # the counters are the run's: a device reset keeps them
    assert (queue.chains_popped, queue.used_added, queue.interrupts_suppressed) == (3, 3, 1)


# --- index wrap at 65535 ---------------------------------------------------------------


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("start", [65530, 65535])
def test_indices_wrap(start: int, event_idx: bool) -> None:
    _, driver, queue = setup(size=4, event_idx=event_idx, start_idx=start)
    for round_ in range(5):
        heads = [driver.add_chain([(bytes([round_, i]), False), (2, True)]) for i in range(2)]
        chains = [pop_chain(queue) for _ in heads]
        assert [c.head for c in chains] == heads
        assert [chain_bytes(driver.mem, c)[0][0] for c in chains] == [bytes([round_, i]) for i in range(2)]
        assert queue.pop() is None
        for chain in chains:
            queue.add_used(chain.head, 2)
        assert driver.used() == [(h, 2) for h in heads]
    end = (start + 10) & 0xFFFF
    assert end < start  # both indices went through 65535 -> 0
    assert driver.avail_idx == queue.next_avail == end
    assert driver.used_idx() == queue.next_used == end
    if event_idx:
        assert driver.avail_event() == end


def test_full_ring_across_wrap() -> None:
    _, driver, queue = setup(size=4, start_idx=65534)
    heads = [driver.add_chain([(b"x", False)]) for _ in range(4)]  # avail.idx: 65534 -> 2
    assert driver.avail_idx == 2
    assert [pop_chain(queue).head for _ in heads] == heads
    assert queue.pop() is None


@pytest.mark.parametrize("avail_idx", [(65534 + 5) & 0xFFFF, 65533, 65534 + 0x8000 - 0x10000])
def test_available_index_jump_across_wrap(avail_idx: int) -> None:
    _, driver, queue = setup(size=4, start_idx=65534)
    driver.set_avail_idx(avail_idx)
    with pytest.raises(QueueError, match="jumped"):
        queue.pop()


# --- notifications (2.7.7, 2.7.10) -------------------------------------------------------


def use_one(driver: VirtqDriver, queue: Queue) -> None:
    driver.add_chain([(4, True)])
    queue.add_used(pop_chain(queue).head, 4)
    driver.used()


def test_no_interrupt_flag_without_event_idx() -> None:
    _, driver, queue = setup()
    use_one(driver, queue)
    assert queue.needs_notification()
    driver.set_no_interrupt(True)
    use_one(driver, queue)
    assert not queue.needs_notification()
    driver.set_no_interrupt(False)
    assert queue.needs_notification()


def test_event_idx_ignores_no_interrupt_flag() -> None:
    # 2.7.7.2: with VIRTIO_F_EVENT_IDX the device ignores the flag; used_event decides.
    _, driver, queue = setup(event_idx=True)
    driver.set_no_interrupt(True)
    use_one(driver, queue)
    assert queue.needs_notification()  # the first one always goes out
    driver.set_used_event(queue.next_used)  # "interrupt me once you write the next entry"
    use_one(driver, queue)
    assert queue.needs_notification()


@pytest.mark.parametrize("start", [0, 100, 65533, 65535])
def test_used_event_crossing(start: int) -> None:
    _, driver, queue = setup(event_idx=True, start_idx=start)
    assert queue.needs_notification()  # no interrupt sent yet
    assert not queue.needs_notification()  # nothing new since
    driver.set_used_event(start + 1)  # interrupt once the entry at start + 1 is written
    use_one(driver, queue)  # entry `start`
    assert not queue.needs_notification()
    use_one(driver, queue)  # entry `start + 1`: crossed
    assert queue.needs_notification()
    use_one(driver, queue)  # used_event is now behind us
    assert not queue.needs_notification()


@pytest.mark.parametrize("start", [0, 65530])
def test_used_event_batch(start: int) -> None:
    _, driver, queue = setup(event_idx=True, start_idx=start)
    queue.needs_notification()
    driver.set_used_event(start + 2)
    for _ in range(2):
        use_one(driver, queue)
    assert not queue.needs_notification()  # entries start, start + 1: not yet
    for _ in range(3):
        use_one(driver, queue)
    assert queue.needs_notification()  # start + 2 .. start + 4 crossed it
    driver.set_used_event(start + 1)  # behind: a batch that does not cross
    for _ in range(3):
        use_one(driver, queue)
    assert not queue.needs_notification()


@pytest.mark.parametrize("event_idx", [False, True])
def test_avail_event_written_when_caught_up(event_idx: bool) -> None:
    """avail_event is published each time the device has consumed all it knew
    of and looks at the available index again (2.7.10), never ahead of it."""
    _, driver, queue = setup(size=4, event_idx=event_idx, start_idx=65535)
    driver.mem.write(driver.used_ring + 4 + 8 * 4, b"\xcd\xab")
    driver.add_chain([(b"x", False)])
    driver.add_chain([(b"y", False)])
    pop_chain(queue)
    assert driver.avail_event() == (65535 if event_idx else 0xABCD)  # where it looked
    pop_chain(queue)
    assert driver.avail_event() == (65535 if event_idx else 0xABCD)  # still within the batch it saw
    driver.add_chain([(b"z", False)])
    pop_chain(queue)  # caught up with the batch: publish 1 (65535 + 2 wraps), look again, find z
    assert driver.avail_event() == (1 if event_idx else 0xABCD)
    assert queue.pop() is None
    assert driver.avail_event() == (2 if event_idx else 0xABCD)


def test_driver_adding_during_a_batch_is_not_missed() -> None:
    """The race event_idx must survive: the driver adds a buffer after the
    device read avail idx; either the device sees it before stopping, or the
    driver's vring_need_event() against avail_event says notify."""
    _, driver, queue = setup(size=8, event_idx=True)
    driver.add_chain([(b"a", False)])
    driver.add_chain([(b"b", False)])
    pop_chain(queue)
    old = driver.avail_idx
    driver.add_chain([(b"c", False)])  # while the device works on its batch
    event = driver.avail_event()
    needs_kick = (driver.avail_idx - event - 1) & 0xFFFF < (driver.avail_idx - old) & 0xFFFF
    seen = [pop_chain(queue), pop_chain(queue)]
    assert len(seen) == 2 or needs_kick
    assert queue.pop() is None


# --- configuration (2.7: sizes and alignments) ---------------------------------------------


def configured(size: int = 8, desc: int = 0x1000, avail: int = 0x2000, used: int = 0x3000) -> Queue:
    queue = vq.Queue(8)
    queue.size, queue.desc_table, queue.avail_ring, queue.used_ring = size, desc, avail, used
    return queue


def test_config_accepts_rings_up_to_region_ends() -> None:
    mem = guest_memory()
    configured(8, LOW_END - 16 * 8, HIGH_END - avail_ring_size(8), HIGH[0]).activate(mem, True)
    configured(8, HIGH[0], LOW[0], LOW_END - used_ring_size(8) - 2).activate(mem, False)  # 70 bytes, 4-aligned
    configured(1).activate(mem, False)


@pytest.mark.parametrize("desc,avail,used,match", [
    (0x1008, 0x2000, 0x3000, "descriptor table .* aligned"),
    (0x1000, 0x2001, 0x3000, "available ring .* aligned"),
    (0x1000, 0x2000, 0x3002, "used ring .* aligned"),
    (HOLE, 0x2000, 0x3000, "descriptor table .* outside"),
    (LOW_END - 16 * 7, 0x2000, 0x3000, "descriptor table .* outside"),  # one descriptor past the end
    (0x1000, LOW_END - avail_ring_size(8) + 2, 0x3000, "available ring .* outside"),  # used_event past the end
    (0x1000, 0x2000, HIGH_END - used_ring_size(8) + 2, "used ring .* outside"),  # avail_event past the end
    (0x1000, 0x2000, 1 << 64, "used ring .* outside"),
])
def test_config_rejects_bad_rings(desc: int, avail: int, used: int, match: str) -> None:
    with pytest.raises(QueueError, match=match):
        configured(8, desc, avail, used).activate(guest_memory(), False)


@pytest.mark.parametrize("size", [0, 3, 6, 16, 65535])
def test_config_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(QueueError, match="power of 2"):
        configured(size).activate(guest_memory(), False)


@pytest.mark.parametrize("max_size", [0, 3, 65536])
def test_max_size_is_host_config(max_size: int) -> None:
    with pytest.raises(ValueError):
        vq.Queue(max_size)


# --- hostile rings, one rule at a time ------------------------------------------------------


def offer_desc(addr: int, length: int, flags: int = 0, next: int = 0) -> Callable[[VirtqDriver], None]:
    def build(driver: VirtqDriver) -> None:
        driver.write_desc(0, addr, length, flags, next)
        driver.offer(0)
    return build


def offer_links(*links: tuple[int, int]) -> Callable[[VirtqDriver], None]:
    """Descriptors index -> next, all chained with NEXT; head is the first."""
    def build(driver: VirtqDriver) -> None:
        for index, nxt in links:
            driver.write_desc(index, HIGH[0], 8, VRING_DESC_F_NEXT, nxt)
        driver.offer(links[0][0])
    return build


def offer_indirect(table_len: int, entries: list[tuple[int, int, int, int]], table: int = HIGH[0] + 0x1000,
                   flags: int = VRING_DESC_F_INDIRECT) -> Callable[[VirtqDriver], None]:
    def build(driver: VirtqDriver) -> None:
        for i, entry in enumerate(entries):
            driver.write_desc(i, *entry, table=table)
        driver.write_desc(3, table, table_len, flags, 4)
        driver.write_desc(4, HIGH[0], 8)
        driver.offer(3)
    return build


def offer_heads(*heads: int) -> Callable[[VirtqDriver], None]:
    def build(driver: VirtqDriver) -> None:
        driver.write_desc(0, HIGH[0], 8)
        for head in heads:
            driver.offer(head)
    return build


GOOD = (HIGH[0], 8, 0, 0)
HOSTILE = {
    "addr in the hole": (offer_desc(HOLE, 8), "buffer .* outside"),
    "addr past the end": (offer_desc(HIGH_END, 1), "buffer .* outside"),
    "addr near 2^64": (offer_desc((1 << 64) - 4, 8), "buffer .* outside"),
    "len past the end": (offer_desc(HIGH_END - 16, 17), "buffer .* outside"),
    "len into the hole": (offer_desc(LOW_END - 8, 16), "buffer .* outside"),
    "len 4 GiB - 1": (offer_desc(HIGH[0], 0xFFFF_FFFF), "buffer .* outside"),
    "next out of range": (offer_desc(HIGH[0], 8, VRING_DESC_F_NEXT, 8), "next descriptor 8 out of range"),
    "next 0xffff": (offer_desc(HIGH[0], 8, VRING_DESC_F_NEXT, 0xFFFF), "out of range"),
    "loop a->b->a": (offer_links((2, 5), (5, 2)), "loops"),
    "self loop": (offer_links((6, 6)), "loops"),
    "longer than the queue": (offer_links(*[(i, (i + 1) % 8) for i in range(8)]), "loops"),
    "indirect in indirect": (offer_indirect(32, [(HIGH[0], 8, VRING_DESC_F_NEXT, 1), (HIGH[0], 16,
                                                 VRING_DESC_F_INDIRECT, 0)]), "indirect descriptor inside"),
    "indirect with NEXT": (offer_indirect(16, [GOOD], flags=VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT),
                           "indirect descriptor with the NEXT flag"),
    "indirect len 0": (offer_indirect(0, [GOOD]), "indirect table length 0"),
    "indirect len 24": (offer_indirect(24, [GOOD, GOOD]), "indirect table length 24"),
    "indirect len 1": (offer_indirect(1, [GOOD]), "indirect table length 1"),
    "indirect too long": (offer_indirect(16 * 32769, [GOOD]), "indirect table length"),
    "indirect in the hole": (offer_indirect(16, [], table=HOLE), "indirect table .* outside"),
    "indirect past the end": (offer_indirect(32, [], table=HIGH_END - 16), "indirect table .* outside"),
    "indirect near 2^64": (offer_indirect(16, [], table=(1 << 64) - 16), "indirect table .* outside"),
    "indirect next out of range": (offer_indirect(32, [(HIGH[0], 8, VRING_DESC_F_NEXT, 2)]), "next descriptor 2"),
    "indirect loop": (offer_indirect(48, [(HIGH[0], 8, VRING_DESC_F_NEXT, 1), (HIGH[0], 8, VRING_DESC_F_NEXT, 2),
                                          (HIGH[0], 8, VRING_DESC_F_NEXT, 0)]), "loops"),
    "indirect buffer outside": (offer_indirect(16, [(HOLE, 8, 0, 0)]), "buffer .* outside"),
    "avail idx jumps": (lambda d: d.set_avail_idx(9), "jumped by 9"),
    "avail idx goes back": (lambda d: d.set_avail_idx(0xFFFF), "jumped by 65535"),
    "head = size": (offer_heads(8), "descriptor index 8 out of range"),
    "head 0xffff": (offer_heads(0, 0xFFFF), "descriptor index 65535"),  # the second pop
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile(case: str) -> None:
    build, match = HOSTILE[case]
    _, driver, queue = setup(size=8)
    build(driver)
    with pytest.raises(QueueError, match=match):
        while queue.pop() is not None:
            pass


@pytest.mark.parametrize("case", ["loop a->b->a", "self loop", "longer than the queue", "indirect loop"])
def test_loop_found_within_one_table(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk is bounded by the table size, not by some larger limit."""
    build, _ = HOSTILE[case]
    mem, driver, queue = setup(size=8)
    build(driver)
    reads = 0
    read = mem.read

    def counting_read(addr: int, length: int) -> bytes:
        nonlocal reads
        reads += 1
        return read(addr, length)

    monkeypatch.setattr(mem, "read", counting_read)
    with pytest.raises(QueueError, match="loops"):
        queue.pop()
    assert reads <= 8 + 1 + 3  # the table once round, plus the indirect descriptor and its 3-entry table


def test_hostile_chain_over_4gib() -> None:
    """2.7.4: a chain describes at most 2^32 bytes; buffers may overlap, so 1 GiB of RAM is enough."""
    try:
        ram = mmap.mmap(-1, 1 << 30)  # untouched, so it costs no host memory
    except OSError as e:
        pytest.skip(f"cannot map 1 GiB: {e}")
    with ram:
        mem = GuestMemory([(0, ram)])
        driver = VirtqDriver.create(mem, 8, base=0x1000)
        queue = make_queue(driver)
        for i in range(4):
            driver.write_desc(i, 0, 1 << 30, VRING_DESC_F_NEXT, i + 1)
        driver.offer(0)  # exactly 4 GiB: allowed
        assert pop_chain(queue).readable_len() == 1 << 32
        driver.write_desc(4, 0x1000, 1)  # was empty: now one byte too many
        driver.offer(0)
        with pytest.raises(QueueError, match="4 GiB"):
            queue.pop()
        del mem, driver, queue


# --- properties ------------------------------------------------------------------------------

# 200 examples a property, or the profile's budget if larger (the "fuzz" profile of
# tests/conftest.py); everything else, derandomize included, comes from the profile.
fuzz = settings(max_examples=max(200, settings.default.max_examples), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class DrawPicker(Picker):
    """Hostile choices drawn by hypothesis, so failures shrink."""

    def __init__(self, data: st.DataObject):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def boolean(self, p: float = 0.5) -> bool:
        if p <= 0 or p >= 1:
            return p >= 1
        return self.integer(0, 999) >= 1000 - p * 1000  # shrinks towards False

    def raw(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))


def run_drawn(data: st.DataObject, mutate: bool) -> None:
    pick = DrawPicker(data)
    ring = hostile_ring(pick, sizes=[1, 2, 4, 8, 16])
    run_hostile(ring, pick, mutate_ring if mutate else None)


class EdgePicker(RandomPicker):
    """Every integer at one end of its range: where a builder packing what it drew overflows."""

    def integer(self, lo: int, hi: int) -> int:
        return hi if self.rng.random() < 0.5 else lo


def test_hostile_driver_builds_rings_at_the_top_of_the_address_space() -> None:
    """Regression: a region at 0xFFFF_FFFF_FFFF_C000 once made the hostile driver's own
    struct.pack fail (an empty "sane" buffer at the region's end is 2^64), at random in CI.
    Hostile values are for the queue: the builder must write whatever it draws."""
    assert LAYOUTS[-1][-1] == (0xFFFF_FFFF_FFFF_C000, 0x4000)  # EdgePicker picks first or last
    assert pack_desc(1 << 64, 0, 0, 0) == pack_desc(0, 0, 0, 0)
    top = 0
    for seed in range(300):
        for sizes in ([max(SIZES)], [1, 2, 4, 8, 16]):
            pick = EdgePicker(Random(seed))
            ring = hostile_ring(pick, sizes)  # no struct.error
            top += ring.layout == LAYOUTS[-1]
            run_hostile(ring, pick, mutate_ring if seed % 2 else None)
    assert top > 100


@fuzz
@given(st.data())
def test_hostile_rings(data: st.DataObject) -> None:
    run_drawn(data, mutate=False)


@fuzz
@given(st.data())
def test_hostile_rings_rewritten_between_pops(data: st.DataObject) -> None:
    run_drawn(data, mutate=True)


@fuzz
@given(size=st.sampled_from([1, 2, 4, 8]), start=st.integers(0, 0xFFFF), event_idx=st.booleans(),
       table=st.binary(min_size=16 * 8, max_size=16 * 8), avail=st.binary(min_size=22, max_size=22),
       indirect=st.binary(min_size=64, max_size=64), seed=st.integers(0, 0xFFFF_FFFF))
def test_random_bytes_rings(size: int, start: int, event_idx: bool, table: bytes, avail: bytes, indirect: bytes,
                            seed: int) -> None:
    """Raw random bytes for the descriptor table, the available ring and an indirect table."""
    backings = [bytearray(LOW[1]), bytearray(HIGH[1])]
    mem = GuestMemory([(LOW[0], backings[0]), (HIGH[0], backings[1])])
    ring = HostileRing([LOW, HIGH], backings, mem, size, size, 0x1000, 0x2000, 0x3000, event_idx, start,
                       tables=[(0x4000, 4)])
    mem.write(0x1000, table[: 16 * size])
    mem.write(0x2000, avail[: avail_ring_size(size)])
    mem.write(0x4000, indirect)
    run_hostile(ring, RandomPicker(Random(seed)))


Part = tuple[bytes | int, bool]
parts = st.lists(st.one_of(st.binary(min_size=1, max_size=40).map(lambda b: (b, False)),
                           st.integers(1, 300).map(lambda n: (n, True))), min_size=1, max_size=4)


@fuzz
@given(start=st.integers(0, 0xFFFF), event_idx=st.booleans(),
       batches=st.lists(st.lists(st.tuples(parts, st.booleans()), min_size=1, max_size=2), min_size=1, max_size=8))
def test_wellformed_chains_round_trip(start: int, event_idx: bool,
                                      batches: list[list[tuple[list[Part], bool]]]) -> None:
    mem, driver, queue = setup(size=8, event_idx=event_idx, start_idx=start)
    for batch in batches:
        heads = [(driver.add_indirect_chain if indirect else driver.add_chain)(chain) for chain, indirect in batch]
        for head, (chain_parts, _) in zip(heads, batch, strict=True):
            chain = pop_chain(queue)
            assert chain.head == head
            want = [(p if isinstance(p, bytes) else bytes(p), w) for p, w in chain_parts]
            assert chain_bytes(mem, chain) == want
        assert queue.pop() is None
        for head in reversed(heads):
            queue.add_used(head, len(heads))
        assert driver.used() == [(h, len(heads)) for h in reversed(heads)]
        if event_idx:
            assert driver.avail_event() == queue.next_avail
    assert sorted(driver.free) == list(range(8))
    assert queue.next_avail == queue.next_used == driver.avail_idx == driver.used_idx()


# --- the frame API (send_chains, reserve...): what virtio-net uses ----------------------


@pytest.fixture
def seqpacket() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.settimeout(2)
    yield a, b
    a.close()
    b.close()


def test_send_chains_writes_each_chain_as_one_record(seqpacket: tuple[socket.socket, socket.socket]) -> None:
    _mem, driver, queue = setup()
    heads = [driver.add_chain([(b"ab", False), (b"cd", False)]), driver.add_chain([(b"xyz", False)])]
    assert queue.send_chains(seqpacket[0].fileno(), 1, 100) == (2, 7, None)
    assert [seqpacket[1].recv(100) for _ in heads] == [b"abcd", b"xyz"]
    assert driver.used() == [(heads[0], 0), (heads[1], 0)]
    assert queue.send_chains(seqpacket[0].fileno(), 1, 100) == (0, 0, None)


@pytest.mark.parametrize(("parts", "code"), [
    ([(b"abc", False), (16, True)], ring.SEND_WRITABLE),
    ([(b"a", False)], ring.SEND_SHORT),
    ([(b"x" * 101, False)], ring.SEND_LONG),
])
def test_send_chains_stops_at_a_chain_it_refuses(seqpacket: tuple[socket.socket, socket.socket],
                                                 parts: list[tuple[bytes | int, bool]], code: int) -> None:
    _mem, driver, queue = setup()
    good = driver.add_chain([(b"ok", False)])
    bad = driver.add_chain(parts)
    later = driver.add_chain([(b"later", False)])
    sent, nbytes, failure = queue.send_chains(seqpacket[0].fileno(), 2, 100)
    assert (sent, nbytes) == (1, 2) and failure is not None and failure[1] == code
    assert driver.used() == [(good, 0), (bad, 0)]  # the refused chain goes back too, nothing written
    assert queue.send_chains(seqpacket[0].fileno(), 2, 100) == (1, 5, None)
    assert driver.used() == [(later, 0)]
    assert [seqpacket[1].recv(100), seqpacket[1].recv(100)] == [b"ok", b"later"]


def test_send_chains_reports_the_errno() -> None:
    _mem, driver, queue = setup()
    head = driver.add_chain([(b"frame", False)])
    r, w = os.pipe()
    os.close(r)
    try:
        sent, _, failure = queue.send_chains(w, 1, 100)  # EPIPE (Python ignores SIGPIPE)
    finally:
        os.close(w)
    assert sent == 0 and failure == (5, errno.EPIPE, 0)
    assert driver.used() == [(head, 0)]


def test_reserve_reads_and_uses_receive_buffers(seqpacket: tuple[socket.socket, socket.socket]) -> None:
    mem, driver, queue = setup()
    heads = [driver.add_chain([(4, True), (6, True)]), driver.add_chain([(10, True)]), driver.add_chain([(10, True)])]
    assert queue.reserve(15, 8, 4) == 20  # more than 15 bytes: two chains
    assert (queue.reserved, queue.reserved_head_len()) == (2, 4)
    seqpacket[1].send(b"0123456789abcde")
    assert queue.readv_reserved(seqpacket[0].fileno()) == 15
    assert queue.peek_reserved(6) == b"012345"
    assert queue.chains_for(15) == 2 and queue.chains_for(10) == 1
    first = driver.buffers[heads[0]][0][0]
    assert queue.use_reserved(15, b"HDR") == 2
    assert driver.used() == [(heads[0], 10), (heads[1], 5)]
    assert mem.read(first, 4) == b"HDR3"
    assert queue.reserved == 0 and queue.readv_reserved(seqpacket[0].fileno()) == -errno.ENOBUFS
    assert queue.reserve(0, 1, 0) == 10 and queue.reserved == 1  # the third chain; one at most
    assert queue.readv_reserved(seqpacket[0].fileno()) == -errno.EAGAIN


@pytest.mark.parametrize(("parts", "match"), [
    ([(b"in", False), (8, True)], "device-readable"),
    ([(3, True)], "3 bytes is smaller than the 4-byte header"),
])
def test_reserve_refuses_bad_receive_buffers(parts: list[tuple[bytes | int, bool]], match: str) -> None:
    _mem, driver, queue = setup()
    driver.add_chain([(8, True)])
    driver.add_chain(parts)
    with pytest.raises(QueueError, match=match):
        queue.reserve(100, 8, 4)
    assert queue.reserved == 1  # the good one stays


# receive_frames: virtio-net's receive loop in the queue. Frames here are a
# 12-byte struct virtio_net_hdr_v1 (flags, gso_type, ..., num_buffers at 10) and a body.
ACCEPT_NONE = net_abi.gso_accepted(False, False, False)


def net_frame(body: int, flags: int = 0, gso: int = 0, fill: int = 0x5A) -> bytes:
    return bytes([flags, gso]) + bytes(range(2, 10)) + b"\xff\xff" + bytes([fill]) * body


def test_receive_frames_gives_back_each_plain_frame(seqpacket: tuple[socket.socket, socket.socket]) -> None:
    mem, driver, queue = setup(size=16)
    heads = [driver.add_chain([(32, True)]) for _ in range(8)]
    addrs = [driver.buffers[h][0][0] for h in heads]
    frames = [net_frame(20, fill=1), net_frame(50, fill=2), net_frame(14, fill=3)]
    for f in frames:
        seqpacket[1].send(f)
    # max_frame 64: room for more than 64 bytes takes three 32-byte chains each time
    got = queue.receive_frames(seqpacket[0].fileno(), 64, 26, 8, ACCEPT_NONE, True)
    assert got == (3, 4, 32 + 62 + 26, -errno.EAGAIN)
    used = driver.used()
    assert [u[1] for u in used] == [32, 32, 30, 26]
    assert mem.read(addrs[0], 32) == frames[0][:10] + b"\x01\x00" + frames[0][12:]  # num_buffers 1
    second = mem.read(addrs[1], 32) + mem.read(addrs[2], 30)
    assert second == frames[1][:10] + b"\x02\x00" + frames[1][12:]  # two chains
    assert queue.reserved == 3  # kept for the next frame


def test_receive_frames_without_csum_clears_the_offload_fields(seqpacket: tuple[socket.socket, socket.socket]) -> None:
    mem, driver, queue = setup(size=16)
    head = driver.add_chain([(128, True)])
    addr = driver.buffers[head][0][0]
    seqpacket[1].send(net_frame(20, flags=net_abi.VIRTIO_NET_HDR_F_DATA_VALID))
    assert queue.receive_frames(seqpacket[0].fileno(), 100, 26, 1, ACCEPT_NONE, False)[:2] == (1, 1)
    assert mem.read(addr, 12) == bytes(10) + b"\x01\x00"


@pytest.mark.parametrize(("frame", "csum"), [
    (net_frame(20, gso=net_abi.VIRTIO_NET_HDR_GSO_TCPV4), True),  # TSO4 not negotiated
    (net_frame(20, flags=net_abi.VIRTIO_NET_HDR_F_NEEDS_CSUM), False),  # a partial checksum, no GUEST_CSUM
    (net_frame(5), True),  # shorter than min_frame
    (net_frame(101), True),  # longer than max_frame: the readv filled the room and more
])
def test_receive_frames_leaves_a_frame_it_does_not_take(seqpacket: tuple[socket.socket, socket.socket],
                                                        frame: bytes, csum: bool) -> None:
    _mem, driver, queue = setup(size=16)
    good = driver.add_chain([(128, True)])
    driver.add_chain([(128, True)])
    seqpacket[1].send(net_frame(20))
    seqpacket[1].send(frame)
    seqpacket[1].send(net_frame(30))
    frames, chains, nbytes, stop = queue.receive_frames(seqpacket[0].fileno(), 100, 26, 1, ACCEPT_NONE, csum)
    assert (frames, chains, nbytes) == (1, 1, 32) and stop == min(len(frame), 128)
    assert driver.used() == [(good, 32)]
    assert queue.reserved == 1 and bytes(queue.peek_reserved(2)) == frame[:2]  # the device's to finish or drop


def test_receive_frames_stops_where_the_buffers_are_too_few(seqpacket: tuple[socket.socket, socket.socket]) -> None:
    _mem, driver, queue = setup(size=16)
    driver.add_chain([(40, True)])
    seqpacket[1].send(net_frame(20))
    assert queue.receive_frames(seqpacket[0].fileno(), 64, 26, 8, ACCEPT_NONE, True) == (0, 0, 0, None)
    assert queue.reserved == 1 and driver.used() == []  # nothing read: the tap still holds the frame
    driver.add_chain([(8, True)])  # a first buffer shorter than the header
    _, driver2, queue2 = setup(size=16)
    driver2.add_chain([(8, True), (100, True)])
    assert queue2.receive_frames(seqpacket[0].fileno(), 64, 26, 8, ACCEPT_NONE, True) == (0, 0, 0, None)


def test_receive_frames_returns_a_broken_chain_after_the_frames_before(
        seqpacket: tuple[socket.socket, socket.socket]) -> None:
    _mem, driver, queue = setup(size=16)
    good = driver.add_chain([(64, True)])
    driver.add_chain([(b"readable", False), (64, True)])
    seqpacket[1].send(net_frame(20))
    frames, chains, nbytes, stop = queue.receive_frames(seqpacket[0].fileno(), 60, 26, 1, ACCEPT_NONE, True)
    assert (frames, chains, nbytes) == (1, 1, 32)
    assert isinstance(stop, QueueError) and "device-readable" in str(stop)
    assert driver.used() == [(good, 32)]


def test_receive_frames_refuses_a_short_table() -> None:
    _mem, _driver, queue = setup()
    with pytest.raises(ValueError, match="256"):
        queue.receive_frames(0, 100, 26, 1, b"\x01" * 255, True)


def test_reserved_buffers_beyond_one_readv_and_a_reset() -> None:
    _mem, driver, queue = setup(size=256)
    for _ in range(5):
        driver.add_indirect_chain([(1, True)] * 250)
    assert queue.reserve(1 << 20, 256, 0) == 1250 and queue.reserved == 5
    assert queue.readv_reserved(0) == -errno.E2BIG  # 1250 buffers: more than IOV_MAX, nothing read
    with pytest.raises(ValueError):
        queue.chains_for(1251)
    queue.reset()
    assert queue.reserved == 0 and queue.reserved_head_len() == 0
