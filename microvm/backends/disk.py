"""A raw disk image: a regular file or a block device, opened, locked and sized.

The host end of a guest disk, in the manner of kvmtool's disk/raw.c: it
reads and writes byte ranges, discards, zeroes and flushes, and knows
nothing of virtio. A device (microvm/devices/virtio/block.py) turns guest
requests into these calls.

Two kinds of failure, kept apart:
- Setting up (open, type, lock, size) raises ConfigError naming the image:
  the user gave a path that cannot be a disk, and nothing has started yet.
- I/O (preadv, pwritev, fallocate, fdatasync) raises OSError: the device
  decides what the guest sees (virtio-blk answers VIRTIO_BLK_S_IOERR).

The RawDisk owns its file descriptor and the lock on it; close() releases
both and may be called more than once. Whoever opens a RawDisk closes it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
from collections.abc import Callable, Sequence

from microvm.errors import ConfigError

SECTOR_SIZE = 512  # Linux's sector (include/linux/blk_types.h): an image is a whole number of them
ZERO_CHUNK = 1 << 20  # write_zeroes without fallocate writes zeros this many bytes at a time

# include/uapi/linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.fallocate.restype = ctypes.c_int

_VectorIO = Callable[[int, Sequence[memoryview], int], int]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode (Python's os has only posix_fallocate). ctypes drops the GIL."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def transfer(io: _VectorIO, fd: int, views: Sequence[memoryview], offset: int) -> int:
    """preadv/pwritev all of `views` at `offset`, resuming after short transfers.

    A transfer of 0 bytes means the end of the file (someone truncated the
    image under us): EIO, since a disk has no short reads."""
    views = list(views)
    done = 0
    while views:
        n = io(fd, views, offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "unexpected end of the image")
        done += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]
    return done


class RawDisk:
    """One raw image, open, locked and checked; its size is fixed at open."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False, direct: bool = False):
        self.path = os.fspath(path)
        self.read_only = read_only
        self.direct = direct
        self.fd = self._open()
        try:
            self.size = self._check()
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        self._zeros: mmap.mmap | None = None  # page aligned, so O_DIRECT accepts it

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"RawDisk({self.path!r}, {mode}, {self.size} bytes{', closed' if self.closed else ''})"

    # --- setup --------------------------------------------------------------------------

    def _fail(self, problem: str) -> ConfigError:
        return ConfigError(f"disk image {self.path}: {problem}")

    def _open(self) -> int:
        flags = (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
        if self.direct:
            flags |= os.O_DIRECT
        try:
            # O_NONBLOCK only so that a FIFO cannot hang the open; cleared in _check.
            return os.open(self.path, flags)
        except FileNotFoundError:
            raise self._fail("no such file") from None
        except PermissionError:
            raise self._fail("permission denied (cannot open it " + ("read-only)" if self.read_only
                                                                     else "read-write)")) from None
        except IsADirectoryError:
            raise self._fail("not a regular file or block device (a directory)") from None
        except OSError as e:
            if self.direct and e.errno == errno.EINVAL:
                raise self._fail("its file system does not support direct I/O (O_DIRECT)") from None
            raise self._fail(f"cannot open: {e.strerror}") from e

    def _check(self) -> int:
        """Type, lock and size of the open image; returns its size in bytes."""
        fd = self.fd
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise self._fail("not a regular file or block device")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        # flock(2) locks belong to the open file description, so a second
        # attachment conflicts even inside this process. Writers take it
        # exclusive, readers shared: many readers, or one writer.
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._fail("locked by another user (attached " + ("read-write elsewhere)" if self.read_only
                                                                   else "elsewhere)")) from None
        except OSError as e:
            raise self._fail(f"cannot lock: {e.strerror}") from e
        size = os.lseek(fd, 0, os.SEEK_END)  # st_size is 0 for a block device
        if size % SECTOR_SIZE:
            raise self._fail(f"size {size} is not a multiple of {SECTOR_SIZE} bytes")
        return size

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Release the lock (closing the only descriptor drops it) and the file. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._zeros is not None:
            self._zeros.close()
            self._zeros = None

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- I/O: every failure is an OSError -------------------------------------------------

    def _live_fd(self, offset: int, length: int, write: bool) -> int:
        """The descriptor, after the checks a caller's bug would fail (not the guest's: the device checks first)."""
        if self.fd < 0:
            raise OSError(errno.EBADF, f"disk image {self.path} is closed")
        if write and self.read_only:
            raise OSError(errno.EBADF, f"disk image {self.path} is read-only")
        if offset < 0 or length < 0 or offset + length > self.size:
            # Past the end a pwritev would grow the image; never let it.
            raise OSError(errno.EINVAL, f"bytes {offset}+{length} outside the image ({self.size} bytes)")
        return self.fd

    def preadv(self, views: Sequence[memoryview], offset: int) -> int:
        """Fill all of `views` from the image at `offset`; returns the bytes read (all of them)."""
        fd = self._live_fd(offset, sum(v.nbytes for v in views), write=False)
        return transfer(os.preadv, fd, views, offset)

    def pwritev(self, views: Sequence[memoryview], offset: int) -> int:
        """Write all of `views` to the image at `offset`; returns the bytes written (all of them)."""
        fd = self._live_fd(offset, sum(v.nbytes for v in views), write=True)
        return transfer(os.pwritev, fd, views, offset)

    def discard(self, offset: int, length: int) -> None:
        """Let the host free [offset, offset+length): a hint, a no-op where holes are unsupported.

        The range reads as zeros afterwards where a hole was punched, and is unchanged otherwise."""
        fd = self._live_fd(offset, length, write=True)
        self._fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make [offset, offset+length) read as zeros; with `unmap` it may also free the space.

        The cheapest way that works: punch a hole (only with unmap), else
        ZERO_RANGE, else write zeros. KEEP_SIZE everywhere: the image never grows."""
        fd = self._live_fd(offset, length, write=True)
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if unmap else []
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        if not any(self._fallocate(fd, mode, offset, length) for mode in modes):
            self._write_zeros(fd, offset, length)

    def flush(self) -> None:
        """Make every completed write stable (fdatasync); nothing to do on a read-only image."""
        if self.fd < 0:
            raise OSError(errno.EBADF, f"disk image {self.path} is closed")
        if not self.read_only:
            os.fdatasync(self.fd)

    @staticmethod
    def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
        """fallocate; False where the file system or device does not do `mode`."""
        if length == 0:
            return True
        try:
            fallocate(fd, mode, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                return False
            raise
        return True

    def _write_zeros(self, fd: int, offset: int, length: int) -> None:
        if self._zeros is None:
            self._zeros = mmap.mmap(-1, ZERO_CHUNK)
        zeros = memoryview(self._zeros)
        try:
            while length:
                n = min(length, ZERO_CHUNK)
                transfer(os.pwritev, fd, [zeros[:n]], offset)
                offset, length = offset + n, length - n
        finally:
            zeros.release()

