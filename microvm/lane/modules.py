"""Inside the lane: load a module of the lane's kernel that its /init did not.

The lane's /init loads what every run needs (initrd.MODULES); a benchmark
that needs more (vhost_vsock, for QEMU's vhost-vsock-device) loads it here,
from the kernel package the lane booted, which the lane sees through its host
share. No modprobe: the package is unpacked without depmod and the host may
have no kmod, so each module goes to init_module(2) as bytes, after what it
depends on (initrd.module_order, as /init's list is built).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence
from pathlib import Path

from microvm.errors import LaneError
from microvm.lane.initrd import _modname, module_order, read_module
from microvm.lane.kernel import cache_dir, cached_kernel

SYS_INIT_MODULE = 175  # x86_64, <asm/unistd_64.h>
SYS_MODULE = Path("/sys/module")


def load(names: Sequence[str]) -> list[str]:
    """Load the modules (and their dependencies) not loaded yet; the names
    loaded now. Only inside the lane, as root: a LaneError otherwise."""
    from microvm.lane.rerun import in_lane

    if not in_lane():
        raise LaneError(f"{', '.join(names)}: the lane's kernel modules load only inside the lane")
    kernel = cached_kernel(cache_dir())
    release = os.uname().release
    if kernel is None or kernel.release != release:
        raise LaneError(f"the lane runs kernel {release}, whose modules are not under {cache_dir()}")
    libc = ctypes.CDLL(None, use_errno=True)
    loaded = []
    for ko in module_order(kernel.modules_dir, names):
        name = _modname(ko)
        if (SYS_MODULE / name).exists():
            continue
        data = read_module(ko)
        # init_module(image, len, params): ctypes passes the bytes as a pointer to their
        # buffer, which `data` keeps alive for the call; the kernel copies it in.
        if libc.syscall(SYS_INIT_MODULE, data, ctypes.c_ulong(len(data)), b"") != 0:
            err = ctypes.get_errno()
            if err != errno.EEXIST:  # loaded meanwhile
                raise LaneError(f"init_module({ko.name}): {os.strerror(err)}")
        loaded.append(name)
    return loaded
