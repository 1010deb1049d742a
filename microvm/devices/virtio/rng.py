"""virtio-rng, the entropy device (virtio 1.2, section 5.4).

One queue, the requestq (5.4.2); no feature bits (5.4.3), no configuration
space (5.4.4). The driver posts device-writable buffers; each is filled
from the host kernel's CSPRNG (getrandom(2), through os.urandom, which
never returns short) and used with the number of bytes written, which is
all the driver reads (5.4.6.1: it "MUST examine the length written").
Linux's driver (drivers/char/hw_random/virtio-rng.c) keeps one buffer of
SMP_CACHE_BYTES in flight; the limits below are for a guest that asks for
far more, by mistake or on purpose:

- A chain gets at most MAX_CHAIN_BYTES, however long it says it is: 5.4.6.2
  lets the device "use less than the entire buffer length", and so one
  request never makes the VMM hold more than 64 KiB.
- One process() stops after MAX_CHAINS_PER_CALL chains or once it has
  written MAX_BYTES_PER_CALL bytes, so a guest that keeps refilling its
  ring cannot hold the shared I/O thread; the rest waits (see "Waking up").
- Device-readable buffers break 5.4.6.1 ("MUST NOT place device-readable
  buffers"), and the spec gives the device no rule for them. Like QEMU's
  virtio-rng we never read them and fill the writable ones; such a chain,
  and one with nothing writable (used with 0), counts in `errors`.
- Every descriptor is validated by the queue (queue.py); a broken ring
  (an address outside guest memory, a loop, an absurd length) is the only
  exception process() lets out, a QueueError, which the transport answers
  with DEVICE_NEEDS_RESET (2.1.2). A chain is checked whole before any
  byte of it is written.

Rate limit (off by default, as in Firecracker's entropy device): a token
bucket of rate_bytes_per_s, holding at most burst_bytes (one second's worth
unless given), full at start: ratelimit.py's Limiter over a bandwidth
TokenBucket. Unlike a disk's, this bucket never goes into debt: a chain waits
until the bucket holds what it asks for (capped at the burst: a longer chain
is served short) and takes only that. The waiting chain is held here, popped
but not used, and served first later. Nothing is dropped. The bucket
survives device resets: resetting does not buy entropy. (Not a Throttle: the
wakeup below also brings back work a per-call budget left, and its contract
is the transport's notify, not a callback.)

Waking up: a device only runs when notified, so when work waits (a chain
over the budget of the bucket or of one call) the device calls
`wakeup(delay)`, if the machine set it. Its contract: call
transport.notify(REQUEST_QUEUE) once, no sooner than `delay` seconds from
now. At most one wakeup is outstanding at a time, so a guest notifying in a
loop cannot multiply timers. IoWakeup below is a ready-made one, on an
I/O thread's timers (the machine's, microvm/machine.py):

    rng = VirtioRng(rate_bytes_per_s=1 << 20)
    transport = devices.add_virtio("rng", rng)
    rng.wakeup = IoWakeup(vm.io, transport.notify)

Without a wakeup, waiting work is served at the guest's next notification
only. Linux's driver posts one buffer and sleeps until it is used, so it
never hits the per-call budgets, but a rate limit without a wakeup leaves
its hwrng reads waiting until something else notifies: set a wakeup
whenever rate_bytes_per_s is set.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from microvm.devices.state import Fields, State
from microvm.devices.virtio import VIRTIO_ID_RNG, QueueState
from microvm.devices.virtio.queue import DescriptorChain
from microvm.errors import ConfigError
from microvm.memory import GuestMemory
from microvm.ratelimit import Limiter, RateLimit, TokenBucket

if TYPE_CHECKING:
    from microvm.iothread import IoThread

log = logging.getLogger(__name__)

REQUEST_QUEUE = 0
QUEUE_SIZE = 256
MAX_CHAIN_BYTES = 64 << 10  # random bytes one chain gets at most
MAX_BYTES_PER_CALL = 1 << 20  # random bytes one process() writes at most
MAX_CHAINS_PER_CALL = QUEUE_SIZE  # chains one process() uses at most
# Added to every delay handed to wakeup(): a timer rounding its deadline down
# by a hair must still find the deadline passed (else the wait would stall).
WAKEUP_SLACK = 0.001

# Every key stats() reports, zero until counted.
RNG_COUNTERS = (
    "requests",  # chains used (returned to the driver)
    "bytes",  # random bytes written into guest buffers
    "errors",  # chains breaking 5.4.6.1 (device-readable buffers) or with nothing writable
    "truncated",  # chains served short of their length (MAX_CHAIN_BYTES or the burst)
    "throttled",  # chains that had to wait for the rate limit
    "deferred",  # process() calls that left work for later (a per-call budget ran out)
    "wakeups",  # wakeups asked of the machine
)


class VirtioRng(QueueState):
    device_type = VIRTIO_ID_RNG
    features = 0
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, rate_bytes_per_s: int | None = None, burst_bytes: int | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        if rate_bytes_per_s is not None and rate_bytes_per_s < 1:
            raise ConfigError(f"virtio-rng rate must be at least 1 byte/s, not {rate_bytes_per_s}")
        if burst_bytes is not None and (rate_bytes_per_s is None or burst_bytes < 1):
            raise ConfigError("virtio-rng burst needs a rate and must be at least 1 byte")
        self.rate_limit = None if rate_bytes_per_s is None else \
            RateLimit(bandwidth=TokenBucket(rate_bytes_per_s, burst_bytes))
        self.wakeup: Callable[[float], None] | None = None  # set by the machine (module docstring)
        self.counters: Counter[str] = Counter(dict.fromkeys(RNG_COUNTERS, 0))
        self._clock = clock
        self._limiter = None if self.rate_limit is None else Limiter(self.rate_limit, clock)
        self._held: DescriptorChain | None = None  # popped, waiting for tokens
        self._wakeup_at: float | None = None  # when the outstanding wakeup is due

    # --- the VirtioDevice interface -----------------------------------------------------------

    def read_config(self, offset: int, size: int) -> int:
        return 0  # 5.4.4: no configuration space

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass

    def reset(self) -> None:
        # The held chain belongs to the old rings. The bucket and an
        # outstanding wakeup stay: both are about time, not about the driver.
        super().reset()
        self._held = None

    # --- snapshots (devices/state.py) ----------------------------------------------------------

    def chains_held(self) -> dict[int, int]:
        """A chain waiting for tokens goes back to the ring in a snapshot: restored, it is served first."""
        return {REQUEST_QUEUE: 1} if self._held is not None else {}

    def snapshot_state(self) -> State:
        """The rate limiter's bucket, in whole bytes (its clock is this process's).
        An outstanding wakeup is not kept: the restore serves the queue once anyway."""
        tokens = 0 if self._limiter is None else int(self._limiter.available())
        return {"kind": "virtio-rng", "tokens": tokens}

    def restore_state(self, state: State) -> None:
        """The saved bucket, no fuller than this device's burst; the refill starts now."""
        tokens = Fields(state, "virtio-rng").integer("tokens")
        if self.rate_limit is not None:
            self._limiter = Limiter(self.rate_limit, self._clock, bandwidth_tokens=tokens)
        self._held = None
        self._wakeup_at = None

    def stats(self) -> dict[str, int]:
        """Requests, bytes, errors and waits (RNG_COUNTERS), for RunResult.stats."""
        return dict(self.counters)

    def process(self, queue_index: int) -> None:
        """Serve the requestq: the driver's notification, or a wakeup. May raise QueueError."""
        mem = self.mem
        if queue_index != REQUEST_QUEUE or mem is None or not self.queues:
            return  # a wakeup that fired after a reset
        assert self.signal is not None
        q = self.queues[REQUEST_QUEUE]
        now = self._clock()
        if self._wakeup_at is not None and now >= self._wakeup_at:
            self._wakeup_at = None
        chains = written = 0
        try:
            while True:
                if chains >= MAX_CHAINS_PER_CALL or written >= MAX_BYTES_PER_CALL:
                    if self._held is not None or q.has_available():
                        self.counters["deferred"] += 1
                        self._request_wakeup(0.0)
                    break
                held, self._held = self._held, None
                chain = held if held is not None else q.pop()
                if chain is None:
                    break
                n = self._serve(mem, chain)
                if n is None:  # over the rate limit: keep it, first in line
                    self._held = chain
                    if held is None:  # counted once, however often it waits
                        self.counters["throttled"] += 1
                    break
                q.add_used(chain.head, n)
                chains += 1
                written += n
        finally:
            if chains:
                self.signal(REQUEST_QUEUE)

    # --- requests ---------------------------------------------------------------------------

    def _serve(self, mem: GuestMemory, chain: DescriptorChain) -> int | None:
        """Fill one chain; the bytes written, or None if it must wait for the rate limit."""
        asked = chain.writable_len()
        want = min(asked, MAX_CHAIN_BYTES)
        limiter = self._limiter
        if limiter is not None and want:
            # Counted here once per chain ("throttled"), not by the limiter.
            wait = limiter.delay(count=False, need=want)  # all of it, or the burst for a longer one
            if wait:
                self._request_wakeup(wait)
                return None
            want = min(want, int(limiter.available()))  # never into debt: served short instead
            limiter.take(want)
        written = 0
        for d in chain.descriptors:
            if written >= want:
                break
            if d.write:
                take = min(d.len, want - written)
                mem.write(d.addr, os.urandom(take))
                written += take
        if len(chain.descriptors) != len(chain.writable):
            self._error("a request with device-readable buffers (5.4.6.1); they were ignored")
        elif not asked:
            self._error("a request with no writable bytes; used with 0")
        if written < asked:
            self.counters["truncated"] += 1
        self.counters["requests"] += 1
        self.counters["bytes"] += written
        return written

    def _request_wakeup(self, delay: float) -> None:
        """Ask the machine to notify us after `delay` s, unless a wakeup is already outstanding."""
        if self.wakeup is None or self._wakeup_at is not None:
            return
        self._wakeup_at = self._clock() + delay
        self.counters["wakeups"] += 1
        self.wakeup(delay + WAKEUP_SLACK)

    def _error(self, why: str) -> None:
        self.counters["errors"] += 1
        if self.counters["errors"] <= 10:  # a flood must not flood the log
            log.warning("virtio-rng: %s", why)


class IoWakeup:
    """A VirtioRng.wakeup from an I/O thread's timers (IoThread.call_later):
    notify(REQUEST_QUEUE) in that thread, after the delay. No thread of its
    own, so nothing to start from a thread under seccomp (a clone there is
    SIGSYS); the I/O thread's close() drops a pending one."""

    def __init__(self, thread: IoThread, notify: Callable[[int], None]):
        self._thread = thread
        self._notify = functools.partial(notify, REQUEST_QUEUE)

    def __call__(self, delay: float) -> None:
        self._thread.call_later(delay, self._notify, name="virtio-rng wakeup")
