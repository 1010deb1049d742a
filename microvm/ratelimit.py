"""Rate limits for a guest's disks and NICs: token buckets, as Firecracker's.

A RateLimit has up to two buckets: bandwidth (bytes) and operations
(requests, frames). A bucket holds at most `size` tokens and refills at
`rate` tokens a second; `one_time_burst` tokens come on top, once, spent
first and never refilled (a fast boot, then the steady rate). An operation
of n bytes goes ahead when both buckets hold tokens: it takes n and 1, and
a bucket may go into debt for an operation bigger than its size (a 1 MiB
request under a 64 KiB bucket waits for the debt to be paid back before the
next one, so the long-run rate holds whatever the sizes). When a bucket is
empty the device leaves the request where it is and asks its I/O thread to
come back when enough tokens have been refilled (Limiter.delay). A device
that never borrows (virtio-rng: entropy owed is not worth having) asks
instead for the bytes it wants in hand (delay's `need`), serves what the
bucket holds (available) and takes that.

RateLimit is the spec (immutable, checked when made); Limiter is one
device's live state, which MicroVM.set_rate_limit can swap while the guest
runs. Counters ("throttled", "throttled_s") land in RunResult.stats.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from microvm.errors import ConfigError

MIN_DELAY = 0.001  # s: no timer finer than this (a bucket that refills faster batches instead)


@dataclass(frozen=True)
class TokenBucket:
    """rate: tokens a second; size: the most it holds (default: one second's
    worth); one_time_burst: extra tokens at the start, spent first."""

    rate: float
    size: float | None = None
    one_time_burst: float = 0

    def __post_init__(self) -> None:
        for name in ("rate", "size", "one_time_burst"):
            value = getattr(self, name)
            if value is None and name == "size":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"TokenBucket {name} must be a finite number, got {value!r}")
        if self.rate <= 0:
            raise ConfigError(f"TokenBucket rate must be positive, got {self.rate!r}")
        if self.size is not None and self.size <= 0:
            raise ConfigError(f"TokenBucket size must be positive, got {self.size!r}")
        if self.one_time_burst < 0:
            raise ConfigError(f"TokenBucket one_time_burst must not be negative, got {self.one_time_burst!r}")

    @property
    def capacity(self) -> float:
        return self.size if self.size is not None else self.rate


@dataclass(frozen=True)
class RateLimit:
    """bandwidth: bytes; ops: requests (a disk) or frames (a NIC). None: unlimited."""

    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None

    def __post_init__(self) -> None:
        for name in ("bandwidth", "ops"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, TokenBucket):
                raise ConfigError(f"RateLimit {name} must be a TokenBucket or None, got {value!r}")


def rate_limit_from(saved: object) -> RateLimit | None:
    """A RateLimit from its dataclasses.asdict() form (a snapshot's configuration)."""
    if saved is None:
        return None
    if not isinstance(saved, dict) or set(saved) - {"bandwidth", "ops"}:
        raise ConfigError(f"a saved rate limit is not {{bandwidth, ops}}: {saved!r}")
    try:
        return RateLimit(**{k: None if v is None else TokenBucket(**v) for k, v in saved.items()})
    except TypeError as e:
        raise ConfigError(f"a saved rate limit is malformed: {saved!r}") from e


def as_rate_limit(name: str, value: object) -> RateLimit | None:
    if value is None or isinstance(value, RateLimit):
        return value
    raise ConfigError(f"{name} must be a RateLimit or None, got {value!r}")


UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def rate_limit_of(what: str, bps: str | None, ops: str | None) -> RateLimit | None:
    """A CLI's bps=N / iops=N (N with an optional K, M or G: 1024s) as a RateLimit, None for neither."""
    if bps is None and ops is None:
        return None

    def rate(text: str | None) -> TokenBucket | None:
        if text is None:
            return None
        number, unit = (text[:-1], text[-1].upper()) if text[-1:].upper() in UNITS and text[-1:].isalpha() \
            else (text, "")
        try:
            value = float(number) * UNITS[unit]
        except ValueError:
            raise ConfigError(f"{what}: {text!r} is not a rate (a number, then K, M or G)") from None
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{what}: a rate must be positive, got {text!r}")
        return TokenBucket(value)

    return RateLimit(bandwidth=rate(bps), ops=rate(ops))


class _Bucket:
    def __init__(self, spec: TokenBucket, now: float, tokens: float | None = None):
        self.rate, self.capacity = float(spec.rate), float(spec.capacity)
        self.tokens = self.capacity if tokens is None else min(float(tokens), self.capacity)
        self.burst = float(spec.one_time_burst)
        self.at = now

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.at)  # a clock that steps back adds nothing (and takes nothing)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.at = now

    def ready(self) -> bool:
        return self.burst > 0 or self.tokens > 0

    def take(self, n: float) -> None:
        from_burst = min(self.burst, n)
        self.burst -= from_burst
        self.tokens -= n - from_burst  # may go below 0: a debt paid back before the next operation

    def wait(self, need: float = 0) -> float:
        """Seconds until the bucket holds a token again; with `need`, until it
        holds that many (no more than its capacity: else it never would)."""
        if need > 0:
            return max(0.0, (min(need, self.capacity) - self.burst - self.tokens) / self.rate)
        return 0.0 if self.ready() else (-self.tokens) / self.rate + 1 / self.rate


class Limiter:
    """One device's buckets. Not thread-safe: used by the device's I/O thread only."""

    def __init__(self, spec: RateLimit, clock: Callable[[], float] = time.monotonic,
                 bandwidth_tokens: float | None = None):
        """bandwidth_tokens: what the bandwidth bucket starts with (no more than
        its size; a restored snapshot's), instead of full."""
        self.spec = spec
        self.clock = clock
        now = clock()
        self.bandwidth = _Bucket(spec.bandwidth, now, bandwidth_tokens) if spec.bandwidth else None
        self.ops = _Bucket(spec.ops, now) if spec.ops else None
        self.throttled = 0  # operations held back (each counted once per wait)
        self.throttled_s = 0.0  # time they waited, in total

    def _buckets(self) -> list[_Bucket]:
        return [b for b in (self.bandwidth, self.ops) if b is not None]

    def delay(self, count: bool = True, need: float = 0) -> float:
        """0 when the next operation may go now (take() it); else the seconds to
        wait, counted as a throttling unless count is False (asked again meanwhile).
        need: bytes the bandwidth bucket must hold first (capped at its size), for
        an operation that will take no more than available(); 0: any token will do."""
        now = self.clock()
        waits = []
        for b in self._buckets():
            b.refill(now)
            wait = b.wait(need if b is self.bandwidth else 0)
            if wait > 0:
                waits.append(wait)
        if not waits:
            return 0.0
        wait = max(MIN_DELAY, max(waits))
        if count:
            self.throttled += 1
            self.throttled_s += wait
        return wait

    def available(self) -> float:
        """Bandwidth tokens in hand now (the one-time burst included); without a
        bandwidth bucket, unlimited (math.inf)."""
        b = self.bandwidth
        if b is None:
            return math.inf
        b.refill(self.clock())
        return b.burst + b.tokens

    def take(self, nbytes: int, ops: int = 1) -> None:
        """Charge nbytes and ops operations (after delay() said 0, or after the fact: a frame read)."""
        if self.bandwidth is not None:
            self.bandwidth.take(nbytes)
        if self.ops is not None:
            self.ops.take(ops)

    def stats(self) -> dict[str, int]:
        return {"throttled": self.throttled, "throttled_ms": round(self.throttled_s * 1000)}


class Throttle:
    """One queue's rate limit inside a device: whether the next operation may
    go (admit), and the way back to the queue once the buckets have refilled
    (bind: the I/O thread's call_later and the queue's notify). A device holds
    back the request it could not admit and serves it first when called again."""

    def __init__(self, spec: RateLimit | None = None, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.limiter = Limiter(spec, clock) if spec is not None else None
        self._call_later: Callable[[float, Callable[[], None]], None] | None = None
        self._retry: Callable[[], None] | None = None
        self._waiting = False  # a retry is scheduled: no second timer
        self._spent = (0, 0.0)  # counters of limiters swapped out, so stats add up

    def bind(self, call_later: Callable[[float, Callable[[], None]], None], retry: Callable[[], None]) -> None:
        self._call_later, self._retry = call_later, retry

    def unbind(self) -> None:
        """The VM is closed: no way back to its queue (nor a reference cycle through it)."""
        self._call_later = self._retry = None

    def set(self, spec: RateLimit | None) -> None:
        """A new limit (None: none), from any thread; what waits is looked at again at once."""
        old = self.limiter
        if old is not None:
            self._spent = (self._spent[0] + old.throttled, self._spent[1] + old.throttled_s)
        self.limiter = Limiter(spec, self.clock) if spec is not None else None
        if self._call_later is not None:
            self._call_later(0, self._fire)

    def ready(self) -> bool:
        """Whether an operation may go now; if not, the queue is notified again
        when the buckets allow (bind). Nothing is charged."""
        limiter = self.limiter  # one read: set() may swap it from another thread
        if limiter is None:
            return True
        wait = limiter.delay(count=not self._waiting)  # a guest knocking while it waits is no new wait
        if wait == 0:
            return True
        if not self._waiting and self._call_later is not None:
            self._waiting = True
            self._call_later(wait, self._fire)
        return False

    def admit(self, nbytes: int) -> bool:
        """True: go ahead (charged nbytes and an operation). False: hold it back (ready)."""
        if not self.ready():
            return False
        self.charge(nbytes)
        return True

    def charge(self, nbytes: int) -> None:
        """One operation of nbytes; after ready(), when its size is only known
        once done (a frame read from the tap). The buckets may go into debt."""
        limiter = self.limiter
        if limiter is not None:
            limiter.take(nbytes)

    def _fire(self) -> None:
        self._waiting = False
        if self._retry is not None:
            self._retry()

    def stats(self) -> dict[str, int]:
        limiter = self.limiter
        throttled = self._spent[0] + (limiter.throttled if limiter else 0)
        seconds = self._spent[1] + (limiter.throttled_s if limiter else 0.0)
        return {"throttled": throttled, "throttled_ms": round(seconds * 1000)}
