"""A vmlinux's bytes in a sealed memfd, shared by every guest this process boots from it.

The loader maps a kernel's PT_LOAD segments into a new guest's RAM
copy-on-write from here (GuestMemory.map_file) instead of copying them: the
guest reads the memfd's pages, which every VM booted from the same image
shares until it writes to one (the kernel patches a few pages of its text
and writes its data: those become its own). So a second boot of the same
kernel in a process neither reads nor copies its ~10 MiB, and N guests hold
one copy of their kernels' read-only pages instead of N.

Only the loadable segments are copied (a vmlinux is half symbols): the
memfd costs their size once per process, in shared memory the guests map.

Why a memfd and not the file itself: a mapping of a file that someone then
truncates (a rebuild of the kernel in place) is SIGBUS on the next touch,
for the guest and for us. The memfd is a copy taken once per image (st_dev,
st_ino, size, mtime), sealed against any change (F_SEAL_SHRINK, GROW,
WRITE, SEAL), so nothing can pull its pages from under a running guest.
At most MAX_IMAGES are kept; an evicted one lives on in the guests that
map it, and goes with the last of them.
"""

from __future__ import annotations

import collections
import fcntl
import os
import threading
from collections.abc import Sequence

MAX_IMAGES = 2
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL

_images: collections.OrderedDict[tuple[object, ...], int] = collections.OrderedDict()
_lock = threading.Lock()


def _reset_after_fork() -> None:  # another thread may have held the lock at the fork (microvm/jail)
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def image_fd(path: str, ranges: Sequence[tuple[int, int]]) -> int | None:
    """A sealed memfd holding the file's bytes in `ranges` ((offset, size):
    the loadable segments) at their offsets, holes elsewhere: a new fd of it,
    the caller's to close (the cache may close its own meanwhile, in another
    thread); None if it cannot be made (the caller then reads the file)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, tuple(ranges))
    with _lock:
        fd = _images.get(key)
        if fd is not None:
            _images.move_to_end(key)
            return os.dup(fd)
        fd = _copy(path, st.st_size, ranges)
        if fd is None:
            return None
        _images[key] = fd
        while len(_images) > MAX_IMAGES:
            os.close(_images.popitem(last=False)[1])
        return os.dup(fd)


def _copy(path: str, size: int, ranges: Sequence[tuple[int, int]]) -> int | None:
    try:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    fd = -1
    try:
        fd = os.memfd_create("microvm-kernel", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)  # sparse: only the ranges take memory
        for offset, length in ranges:
            if offset < 0 or length < 0 or offset + length > size:
                raise OSError(f"range {offset}+{length} is outside the {size}-byte file")
            os.lseek(fd, offset, os.SEEK_SET)
            done = 0
            while done < length:
                n = os.sendfile(fd, src, offset + done, length - done)
                if n <= 0:
                    raise OSError("the file shrank while it was copied")
                done += n
        if os.fstat(src).st_size != size:
            raise OSError("the file changed while it was copied")
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        return fd
    except OSError:
        if fd >= 0:
            os.close(fd)
        return None
    finally:
        os.close(src)


def fds() -> set[int]:
    """The cached images' fds (a jailed VMM keeps them: sealed, read-only kernels)."""
    with _lock:
        return set(_images.values())


def clear() -> None:
    """Close every cached image (tests; a process that is done booting)."""
    with _lock:
        while _images:
            os.close(_images.popitem()[1])
