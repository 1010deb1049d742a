"""The Cython virtqueue against the Python reference, on the same hostile rings.

Each ring (and the racing guest that rewrites it) is built from one stream of
choices, recorded for the first queue and replayed for the second: both must
return the same chains and notification answers, raise the same errors with
the same messages, and leave guest memory byte for byte the same
(tests/support/virtio_driver.run_differential). tests/fuzz/fuzz_virtqueue.py
runs the same comparison over a million rings.
"""

from __future__ import annotations

from collections import Counter
from random import Random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microvm._kvm import Mapping
from microvm.devices.virtio.queue import DescriptorChain, PyQueue
from microvm.errors import GuestMemoryError
from microvm.memory import GuestMemory
from tests.support.virtio_driver import (
    Divergence,
    Outcome,
    RandomPicker,
    VirtqDriver,
    make_queue,
    run_differential,
)
from tests.unit.test_virtqueue import DrawPicker

CQueue = pytest.importorskip("microvm._virtq").Queue
BOTH = (PyQueue, CQueue)
fuzz = settings(max_examples=max(300, settings.default.max_examples), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@fuzz
@given(data=st.data(), mutate=st.booleans())
def test_both_queues_agree_on_hostile_rings(data: st.DataObject, mutate: bool) -> None:
    run_differential(DrawPicker(data), BOTH, sizes=[1, 2, 4, 8, 16], mutate_rate=1.0 if mutate else 0.0)


def seeded_rings(prefix: str, **options: bool) -> list[Outcome]:
    """A thousand seeded rings through both queues: every one alike, every kind of ending met."""
    kinds = {"drained": 0, "queue error": 0, "refused": 0}
    outcomes = []
    for seed in range(1000):
        outcome, _ = run_differential(RandomPicker(Random(f"{prefix}:{seed}")), BOTH, **options)
        assert isinstance(outcome, Outcome), outcome  # no other exception, no broken invariant
        kinds["refused" if outcome.config_error else "queue error" if outcome.error else "drained"] += 1
        outcomes.append(outcome)
    assert all(n > 20 for n in kinds.values()), kinds  # every kind of ending was compared
    return outcomes


def steps(outcomes: list[Outcome]) -> Counter[str]:
    """How often each call of the frame API or serve_block_io was compared."""
    return Counter(str(step[0]) for o in outcomes for step in o.trace
                   if isinstance(step, tuple) and isinstance(step[0], str))


def test_both_queues_agree_on_a_thousand_seeded_rings() -> None:
    seeded_rings("differential")


@fuzz
@given(data=st.data(), mutate=st.booleans())
def test_both_queues_agree_through_the_frame_api(data: st.DataObject, mutate: bool) -> None:
    run_differential(DrawPicker(data), BOTH, sizes=[1, 2, 4, 8, 16], mutate_rate=1.0 if mutate else 0.0, frames=True)


def test_both_queues_agree_through_the_frame_api_on_a_thousand_seeded_rings() -> None:
    seen = steps(seeded_rings("frames", frames=True))
    # each call compared (receive_frames reserves too: fewer plain reserve steps than before it)
    assert seen["send"] > 100 and seen["reserve"] > 40 and seen["use"] > 5 and seen["receive"] > 50, seen


@fuzz
@given(data=st.data(), mutate=st.booleans())
def test_both_queues_agree_through_serve_block_io(data: st.DataObject, mutate: bool) -> None:
    run_differential(DrawPicker(data), BOTH, sizes=[1, 2, 4, 8, 16], mutate_rate=1.0 if mutate else 0.0, block=True)


def test_both_queues_agree_through_serve_block_io_on_a_thousand_seeded_rings() -> None:
    calls = [step[1] for o in seeded_rings("block", block=True) for step in o.trace
             if isinstance(step, tuple) and step[0] == "block"]
    declined = sum(bool(result[5]) for result in calls)
    assert declined > 1000 and len(calls) - declined > 50, (len(calls), declined)  # both ends compared


@pytest.mark.parametrize("seed", ["29:9313", "29:14157", "29:17113", "29:32527", "29:46071"])
def test_rings_the_fuzz_run_found(seed: str) -> None:
    """Their used rings overlap the descriptors: PyQueue.send_chains wrote its used
    elements only at the end, the Cython queue each as it went; both now do the latter."""
    outcome, _ = run_differential(RandomPicker(Random(seed)), BOTH, mutate_rate=0.2, frames=True)
    assert isinstance(outcome, Outcome)


class OffByOne(PyQueue):
    """A queue with a planted bug: it reports one byte more of the last descriptor."""

    def pop(self) -> DescriptorChain | None:
        chain = super().pop()
        if chain is not None and chain.descriptors:
            last = chain.descriptors[-1]
            chain.descriptors[-1] = last._replace(len=last.len + 1)
        return chain


def test_the_comparison_catches_a_difference() -> None:
    with pytest.raises(Divergence, match="differ in outcome"):
        for seed in range(200):
            run_differential(RandomPicker(Random(f"planted:{seed}")), (CQueue, OffByOne))


# --- the Cython queue holds guest memory until reset or release -----------------------------


@pytest.mark.parametrize("backing", ["bytearray", "mapping"])
def test_guest_memory_is_not_unmapped_under_a_live_cython_queue(backing: str) -> None:
    size = 1 << 16
    mem = GuestMemory([(0, bytearray(size) if backing == "bytearray" else Mapping(size))])
    driver = VirtqDriver.create(mem, 8, base=0x1000, data=(0x8000, size))
    queue = make_queue(driver, queue_class=CQueue)
    driver.add_chain([(b"hello", False)])
    assert queue.pop() is not None
    if backing == "mapping":
        with pytest.raises(GuestMemoryError, match="still in use"):
            mem.close()
        assert mem.read(0x8000, 5) == b"hello"  # refused, and nothing changed
    queue.release()
    with pytest.raises(Exception, match="not ready"):
        queue.pop()
    mem.close()


def test_reset_lets_go_of_guest_memory_too() -> None:
    mem = GuestMemory([(0, Mapping(1 << 16))])
    queue = make_queue(VirtqDriver.create(mem, 8, base=0x1000, data=(0x8000, 1 << 16)), queue_class=CQueue)
    queue.reset()
    assert queue.mem is None
    mem.close()
