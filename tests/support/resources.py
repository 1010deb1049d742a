"""What a VM's teardown must give back, counted in this process."""

from __future__ import annotations

import os

import psutil

from microvm import teardown
from microvm.loader import kernelcache


def open_fds(proc: psutil.Process | None = None) -> int:
    """This process's open fds once every closed VM is destroyed (teardown.py:
    the kernel's part, a few ms after close() in a thread of its own), but the
    kernel cache's sealed images (loader/kernelcache.py): kept for the
    process's life on purpose, at most MAX_IMAGES of them, so a new kernel
    may add one that is no leak."""
    if proc is None or proc.pid == os.getpid():
        assert teardown.drain(30.0), "a closed VM was not destroyed within 30 s"
    return (proc or psutil.Process()).num_fds() - len(kernelcache.fds())
