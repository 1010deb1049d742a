"""What a VM's teardown must give back, counted in this process."""

from __future__ import annotations

import psutil

from microvm.loader import kernelcache


def open_fds(proc: psutil.Process | None = None) -> int:
    """This process's open fds, but the kernel cache's sealed images
    (loader/kernelcache.py): kept for the process's life on purpose, at
    most MAX_IMAGES of them, so a new kernel may add one that is no leak."""
    return (proc or psutil.Process()).num_fds() - len(kernelcache.fds())
