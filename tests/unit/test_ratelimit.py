"""Rate limits (microvm/ratelimit.py): token buckets on a clock we move by
hand, a disk held to them through its queue (a fake driver writing rings),
and the I/O thread's timers that bring a held-back queue back."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from microvm.devices.virtio import mmio as m
from microvm.errors import ConfigError
from microvm.iothread import IoThread
from microvm.ratelimit import Limiter, RateLimit, Throttle, TokenBucket, rate_limit_of
from microvm.specs import Drive, Nic
from tests.unit.test_virtio_block import T_IN, Disk, hdr


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_lets_its_size_through_then_its_rate() -> None:
    clock = Clock()
    lim = Limiter(RateLimit(ops=TokenBucket(rate=10, size=5)), clock)
    went = 0
    while lim.delay() == 0:
        lim.take(0)
        went += 1
    assert went == 5
    wait = lim.delay()
    assert 0.09 <= wait <= 0.11  # one token at 10 a second
    clock.now += 1.0
    went = 0
    while lim.delay() == 0:
        lim.take(0)
        went += 1
    assert went == 5  # a second refills 10, but the bucket holds 5


def test_one_time_burst_is_spent_first_and_never_comes_back() -> None:
    clock = Clock()
    lim = Limiter(RateLimit(bandwidth=TokenBucket(rate=1000, size=1000, one_time_burst=5000)), clock)
    for _ in range(6):  # 5000 of burst, then the 1000 the bucket holds
        assert lim.delay() == 0
        lim.take(1000)
    assert lim.delay() > 0
    clock.now += 10
    for _ in range(1):
        assert lim.delay() == 0
        lim.take(1000)
    assert lim.delay() > 0


def test_a_big_operation_puts_the_bucket_in_debt_and_the_long_run_rate_holds() -> None:
    clock = Clock()
    lim = Limiter(RateLimit(bandwidth=TokenBucket(rate=1 << 20, size=64 << 10)), clock)
    moved, start = 0, clock.now
    for _ in range(20):  # 1 MiB requests through a 64 KiB bucket at 1 MiB/s
        while (wait := lim.delay()) > 0:
            clock.now += wait
        lim.take(1 << 20)
        moved += 1 << 20
    elapsed = clock.now - start
    assert 18.9 <= elapsed <= 19.0  # 20 MiB at 1 MiB/s: the first went at once, on the bucket's 64 KiB
    assert lim.throttled == 19


def test_a_bucket_that_never_borrows_waits_for_what_it_needs_in_hand() -> None:
    """delay(need=n): n bytes in hand first (no more than the size); available(): what may be taken."""
    clock = Clock()
    lim = Limiter(RateLimit(bandwidth=TokenBucket(rate=100, size=200)), clock)
    assert lim.delay(need=150) == 0 and lim.available() == 200
    lim.take(150)
    assert lim.delay(need=150) == pytest.approx(1.0)  # 50 in hand: 100 more at 100 a second
    assert lim.delay(need=10_000) == pytest.approx(1.5)  # capped at the size: it fills in time
    clock.now += 1.0
    assert lim.delay(need=150) == 0 and lim.available() == pytest.approx(150)
    clock.now -= 5.0  # a clock stepping back neither adds nor takes
    assert lim.available() == pytest.approx(150)
    assert Limiter(RateLimit(bandwidth=TokenBucket(rate=100, size=200)), clock, bandwidth_tokens=500).available() == 200
    assert Limiter(RateLimit(ops=TokenBucket(rate=1)), clock).available() == float("inf")


@pytest.mark.parametrize("bad", [
    {"rate": 0}, {"rate": -1}, {"rate": float("nan")}, {"rate": True}, {"rate": "10"},
    {"rate": 1, "size": 0}, {"rate": 1, "one_time_burst": -1}, {"rate": 1, "size": float("inf")},
])
def test_bad_buckets_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="TokenBucket"):
        TokenBucket(**bad)  # type: ignore[arg-type]


def test_specs_take_rate_limits_and_their_cli_forms() -> None:
    assert Drive.parse("d.img,bps=4M,iops=100").rate_limit == RateLimit(TokenBucket(4 << 20), TokenBucket(100))
    assert Drive.parse("d.img").rate_limit is None
    assert Nic.parse("tap=t0,tx_bps=1K").tx_rate_limit == RateLimit(TokenBucket(1024))
    for bad in ("d.img,bps=fast", "d.img,bps=0", "d.img,bps=-1M", "d.img,iops="):
        with pytest.raises(ConfigError):
            Drive.parse(bad)
    with pytest.raises(ConfigError, match="rate_limit"):
        Drive("d.img", rate_limit=10)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rx_rate_limit"):
        Nic("t0", rx_rate_limit=TokenBucket(1))  # type: ignore[arg-type]
    assert rate_limit_of("x", None, None) is None


class Timers:
    """call_later as a list: (delay, callback)."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, object]] = []

    def __call__(self, delay: float, callback: object) -> None:
        self.pending.append((delay, callback))

    def fire(self) -> None:
        pending, self.pending = self.pending, []
        for _, callback in pending:
            callback()  # type: ignore[operator]


def limited_disk(path: Path, limit: RateLimit, clock: Clock) -> tuple[Disk, Timers]:
    d = Disk(path, queue_size=32)
    d.dev.throttle = Throttle(limit, clock)
    timers = Timers()
    d.dev.throttle.bind(timers, lambda: d.t.notify(0))
    return d, timers


def test_a_disk_serves_what_its_limit_allows_and_the_rest_when_the_timer_fires(tmp_path: Path) -> None:
    from tests.unit.test_virtio_block import make_image

    make_image(tmp_path / "d.img")
    clock = Clock()
    d, timers = limited_disk(tmp_path / "d.img", RateLimit(ops=TokenBucket(rate=4, size=2)), clock)
    try:
        heads = [d.submit([(hdr(T_IN, n), False), (512, True), (1, True)])[0] for n in range(6)]
        d.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
        assert d.q.used() == [(h, 513) for h in heads[:2]]  # 512 bytes read and the status
        assert len(timers.pending) == 1 and 0.2 <= timers.pending[0][0] <= 0.3
        assert d.dev.chains_held() == {0: 1}  # popped and held: a snapshot hands it back
        d.d.w(m.VIRTIO_MMIO_QUEUE_NOTIFY, 0)  # the guest knocks again: still nothing, no second timer
        assert d.q.used() == [] and len(timers.pending) == 1
        clock.now += 0.5  # two more tokens
        timers.fire()
        assert [h for h, _ in d.q.used()] == heads[2:4]
        d.dev.throttle.set(None)  # lifted while held back: what waits goes at once
        timers.fire()
        assert [h for h, _ in d.q.used()] == heads[4:]
        assert d.dev.stats()["throttled"] >= 2 and d.dev.stats()["reads"] == 6
    finally:
        d.close()


def test_the_io_threads_timers_run_in_the_thread_in_order() -> None:
    io = IoThread("t")
    got: list[tuple[str, str | None]] = []
    done = threading.Event()
    io.start()
    io.call_later(0.05, lambda: got.append(("late", threading.current_thread().name)))
    io.call_later(0.01, lambda: got.append(("early", threading.current_thread().name)))
    io.call_later(0.08, done.set)
    io.add(*_never_ready())  # a thread with something to serve is running
    try:
        assert done.wait(5)
        assert got == [("early", "t"), ("late", "t")]
    finally:
        io.close()


def _never_ready() -> tuple[int, object]:
    import os

    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    return fd, lambda: None


def test_a_nic_holds_frames_both_ways_to_its_limits() -> None:
    from tests.unit.test_virtio_net import RXQ, TXQ, Nic, frame, post_and_collect

    clock = Clock()
    nic = Nic()
    try:
        timers = Timers()
        nic.dev.tx_throttle = Throttle(RateLimit(ops=TokenBucket(rate=10, size=2)), clock)
        nic.dev.rx_throttle = Throttle(RateLimit(ops=TokenBucket(rate=10, size=1)), clock)
        nic.dev.tx_throttle.bind(timers, lambda: nic.t.notify(TXQ))
        nic.dev.rx_throttle.bind(timers, lambda: nic.t.notify(RXQ))
        for n in range(3):
            nic.tx.add_chain([(frame(100, seed=n), False)])
        nic.t.notify(TXQ)
        assert len(nic.tx.used()) == 2 and nic.dev.chains_held() == {TXQ: 1}
        for n in range(3):
            nic.tap.peer.send(frame(50, seed=10 + n))
        assert len(post_and_collect(nic, [2048] * 4)) == 1  # one frame's token
        clock.now += 0.2
        timers.fire()
        assert len(nic.tx.used()) == 1 and TXQ not in nic.dev.chains_held()
        assert len([h for h, _ in nic.rx.used()]) == 1  # the rx bucket holds one: one more frame
        assert [nic.tap.peer.recv(1 << 16) for _ in range(3)] == [frame(100, seed=n) for n in range(3)]
        stats = nic.dev.stats()
        assert stats["tx_throttled"] >= 1 and stats["rx_throttled"] >= 1 and stats["tx_frames"] == 3
    finally:
        nic.close()


def test_rate_limits_are_part_of_a_snapshots_machine_configuration(tmp_path: Path) -> None:
    import json

    from microvm.machine import MicroVM

    kernel, image = tmp_path / "vmlinux", tmp_path / "d.img"
    kernel.write_bytes(b"\x7fELF")
    image.write_bytes(bytes(4096))
    disk = RateLimit(bandwidth=TokenBucket(4 << 20, size=1 << 20, one_time_burst=8 << 20), ops=TokenBucket(100))
    rx = RateLimit(bandwidth=TokenBucket(1 << 20))
    m = MicroVM(kernel, drives=[Drive(image, rate_limit=disk)], nics=[Nic("t0", rx_rate_limit=rx)])
    config = json.loads(json.dumps(m._snapshot_config()))  # as the snapshot's file keeps it
    back = MicroVM._from_config(config, vsock=None, nics=None, console=None, stdout=None, force=True)
    assert back.drives[0].rate_limit == disk
    assert (back.nics[0].rx_rate_limit, back.nics[0].tx_rate_limit) == (rx, None)
