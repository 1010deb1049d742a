"""A restored or forked guest's identity: entropy, time, preloaded modules.

Clones of one snapshot share their kernel's random pool, their Python
random state and the clock they stopped with. Our kernel has no ACPI, so
no VM generation ID tells them; the host does, with a `refresh` request
right after restore or fork (sandbox/core.py):

- host entropy goes into the kernel's pool with RNDADDENTROPY (credited),
  and RNDRESEEDCRNG makes the CRNG use it now (random(4)), so each clone's
  getrandom() and /dev/urandom differ from the first byte on;
- the wall clock is set to the host's (the KVM clock only kept counting
  from where the snapshot stopped);
- Python's random is reseeded here; a call process reseeds its own (and
  numpy's global generator, if loaded) when its call comes
  (reseed_process), since the spare one was forked before the snapshot.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import random
import struct
import sys
import time

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
MAX_ENTROPY = 512


def add_entropy(data: bytes) -> None:
    """Credit `data` to the kernel's pool and reseed its CRNG (needs CAP_SYS_ADMIN)."""
    data = data[:MAX_ENTROPY]
    info = struct.pack("ii", len(data) * 8, len(data)) + data  # struct rand_pool_info
    fd = os.open("/dev/random", os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, RNDADDENTROPY, info)
        fcntl.ioctl(fd, RNDRESEEDCRNG)
    finally:
        os.close(fd)


def refresh(entropy: bytes, time_ns: int | None) -> None:
    if entropy:
        add_entropy(entropy)
    if time_ns:
        time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
    random.seed()


def reseed_process() -> None:
    """Fresh random state for this process from the kernel's pool: Python's
    random, and numpy's legacy global generator if numpy is loaded."""
    random.seed()
    np_random = sys.modules.get("numpy.random")
    if np_random is not None:
        try:
            np_random.seed()
        except Exception:  # a numpy without it: nothing to reseed
            pass


def preload(modules: list[str]) -> list[str]:
    """Import `modules` into the agent itself, so every call process forked
    from now on starts with them; the names that failed, with why."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # reported to the host, which raises
            failed.append(f"{name}: {type(e).__name__}: {e}")
    return failed
