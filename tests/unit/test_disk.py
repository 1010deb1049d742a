"""RawDisk (microvm/backends/disk.py) on real files: no virtio, no KVM.

Setup failures are ConfigErrors that name the image; I/O failures are
OSErrors. What a test asserts is what a user sees: the message, the bytes
of the image file, its size.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from random import Random

import pytest

from microvm.backends import disk as rawdisk
from microvm.backends.disk import RawDisk, transfer
from microvm.errors import ConfigError

SIZE = 16 * 512
PUNCH = rawdisk.FALLOC_FL_PUNCH_HOLE | rawdisk.FALLOC_FL_KEEP_SIZE
ZERO_RANGE = rawdisk.FALLOC_FL_ZERO_RANGE | rawdisk.FALLOC_FL_KEEP_SIZE


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "disk.img"
    data = Random(1).randbytes(SIZE)
    path.write_bytes(data)
    return path, data


@pytest.fixture
def disk(image: tuple[Path, bytes]) -> Iterator[RawDisk]:
    with RawDisk(image[0]) as d:
        yield d


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- opening: ConfigError naming the image ----------------------------------------------------


def test_opens_locks_and_sizes(image: tuple[Path, bytes]) -> None:
    path, _ = image
    with RawDisk(path) as d:
        assert (d.path, d.read_only, d.direct, d.size, d.closed) == (str(path), False, False, SIZE, False)
        assert not fcntl.fcntl(d.fd, fcntl.F_GETFL) & os.O_NONBLOCK  # only for the open
        assert fcntl.fcntl(d.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert "disk.img" in repr(d) and "rw" in repr(d)
    assert d.closed and "closed" in repr(d)


def test_empty_image_is_fine(tmp_path: Path) -> None:
    (tmp_path / "empty.img").write_bytes(b"")
    with RawDisk(tmp_path / "empty.img") as d:
        assert d.size == 0


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"disk image .*nope\.img: no such file"):
        RawDisk(tmp_path / "nope.img")


@pytest.mark.parametrize("read_only", [False, True])
def test_directory(tmp_path: Path, read_only: bool) -> None:
    with pytest.raises(ConfigError, match=rf"disk image {tmp_path}: not a regular file or block device"):
        RawDisk(tmp_path, read_only=read_only)


def test_fifo_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    for read_only in (True, False):  # no reader or writer on the other end: a blocking open would hang
        with pytest.raises(ConfigError, match=r"disk image .*fifo: not a regular file or block device$"):
            RawDisk(tmp_path / "fifo", read_only=read_only)


def test_character_device_is_refused() -> None:
    with pytest.raises(ConfigError, match="disk image /dev/null: not a regular file or block device"):
        RawDisk("/dev/null", read_only=True)


def test_size_not_multiple_of_512(tmp_path: Path) -> None:
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    with pytest.raises(ConfigError, match=r"disk image .*odd\.img: size 1000 is not a multiple of 512 bytes"):
        RawDisk(tmp_path / "odd.img")


def test_other_open_errors_are_named(tmp_path: Path) -> None:
    loop = tmp_path / "loop.img"
    loop.symlink_to(loop)
    with pytest.raises(ConfigError, match=r"disk image .*loop\.img: cannot open: Too many levels of symbolic"):
        RawDisk(loop)


def test_direct_io_unsupported(image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(ConfigError, match=r"disk image .*disk\.img: its file system does not support direct I/O"):
        RawDisk(image[0], direct=True)
    RawDisk(image[0]).close()  # EINVAL means O_DIRECT only when it was asked for


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "secret.img"
    path.write_bytes(bytes(512))
    path.chmod(0)
    with pytest.raises(ConfigError, match=r"secret\.img: permission denied \(cannot open it read-only\)"):
        RawDisk(path, read_only=True)


def test_read_only_file_cannot_be_opened_read_write(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(512))
    path.chmod(0o444)
    if os.access(path, os.W_OK):
        pytest.skip("root writes anything")
    with pytest.raises(ConfigError, match=r"ro\.img: permission denied \(cannot open it read-write\)"):
        RawDisk(path)
    RawDisk(path, read_only=True).close()


def test_failed_opens_leak_no_descriptor(tmp_path: Path) -> None:
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    os.mkfifo(tmp_path / "fifo")
    before = open_fds()
    for bad in ("odd.img", "fifo", "missing.img"):
        with pytest.raises(ConfigError):
            RawDisk(tmp_path / bad, read_only=True)
    assert open_fds() == before


# --- locking: one writer or many readers ----------------------------------------------------------


def test_one_writer_or_many_readers(image: tuple[Path, bytes]) -> None:
    path = image[0]
    writer = RawDisk(path)
    with pytest.raises(ConfigError, match=r"disk image .*disk\.img: locked by another user \(attached elsewhere\)"):
        RawDisk(path)
    with pytest.raises(ConfigError, match=r"locked by another user \(attached read-write elsewhere\)"):
        RawDisk(path, read_only=True)
    writer.close()
    writer.close()  # idempotent
    readers = [RawDisk(path, read_only=True), RawDisk(path, read_only=True)]
    with pytest.raises(ConfigError, match=r"locked by another user \(attached elsewhere\)"):
        RawDisk(path)
    readers[0].close()
    with pytest.raises(ConfigError, match="locked"):
        RawDisk(path)  # one reader is still there
    readers[1].close()
    RawDisk(path).close()


def test_lock_held_by_another_program(image: tuple[Path, bytes]) -> None:
    """flock(2) locks are advisory but shared with every program that uses them (qemu, another microvm)."""
    fd = os.open(image[0], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        RawDisk(image[0], read_only=True).close()
        with pytest.raises(ConfigError, match="locked by another user"):
            RawDisk(image[0])
    finally:
        os.close(fd)
    RawDisk(image[0]).close()


def test_other_lock_errors_are_named(image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    def nolck(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", nolck)
    before = open_fds()
    with pytest.raises(ConfigError, match=r"disk image .*disk\.img: cannot lock: No locks available"):
        RawDisk(image[0])
    assert open_fds() == before


# --- preadv / pwritev -------------------------------------------------------------------------------


def test_read_and_write_lists_of_views(disk: RawDisk, image: tuple[Path, bytes]) -> None:
    path, content = image
    a, b = bytearray(100), bytearray(924)
    assert disk.preadv([memoryview(a), memoryview(b)], 1536) == 1024
    assert bytes(a + b) == content[1536:2560]
    new = Random(2).randbytes(1500)
    assert disk.pwritev([memoryview(new)[:7], memoryview(new)[7:]], 100) == 1500
    assert path.read_bytes() == content[:100] + new + content[1600:]
    assert disk.preadv([], 0) == 0 and disk.pwritev([], SIZE) == 0


def test_short_transfers_are_resumed(disk: RawDisk, image: tuple[Path, bytes],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """preadv/pwritev may move fewer bytes than asked (a signal, a device's limit): go on from there."""
    path, content = image
    calls: list[tuple[int, int]] = []

    def short(real):  # type: ignore[no-untyped-def]
        def io(fd: int, buffers: list[memoryview], offset: int) -> int:
            calls.append((offset, sum(len(b) for b in buffers)))
            return int(real(fd, [buffers[0][:max(1, len(buffers[0]) // 3)]], offset))
        return io

    monkeypatch.setattr(os, "preadv", short(os.preadv))
    monkeypatch.setattr(os, "pwritev", short(os.pwritev))
    data = Random(3).randbytes(2048)
    assert disk.pwritev([memoryview(data)[:700], memoryview(data)[700:]], 1024) == 2048
    assert len(calls) > 2 and calls[0] == (1024, 2048) and calls[1] == (1024 + 233, 2048 - 233)
    back = [bytearray(1000), bytearray(24), bytearray(1024)]
    assert disk.preadv([memoryview(x) for x in back], 1024) == 2048
    assert b"".join(back) == data
    assert path.read_bytes() == content[:1024] + data + content[3072:]


def test_transfer_on_a_pipe() -> None:
    """transfer() over a pipe, whose writes and reads are short by nature (here: at most 5 bytes)."""
    r, w = os.pipe()
    try:
        def write5(fd: int, views: list[memoryview], offset: int) -> int:
            return os.writev(fd, [views[0][:5]])

        def read5(fd: int, views: list[memoryview], offset: int) -> int:
            return os.readv(fd, [views[0][:5]])

        data = bytes(range(40))
        assert transfer(write5, w, [memoryview(data[:13]), memoryview(data[13:])], 0) == 40
        out = [bytearray(3), bytearray(37)]
        assert transfer(read5, r, [memoryview(x) for x in out], 0) == 40
        assert b"".join(out) == data
        os.close(w)
        w = -1
        with pytest.raises(OSError, match="unexpected end of the image") as e:
            transfer(read5, r, [memoryview(bytearray(1))], 0)  # end of file: no short disk reads
        assert e.value.errno == errno.EIO
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_image_truncated_under_us(disk: RawDisk, image: tuple[Path, bytes]) -> None:
    os.truncate(image[0], 1024)
    buf = bytearray(1024)
    with pytest.raises(OSError, match="unexpected end of the image") as e:
        disk.preadv([memoryview(buf)], 512)  # 512 bytes, then the end of the file
    assert e.value.errno == errno.EIO
    assert buf[:512] == image[1][512:1024]


@pytest.mark.parametrize("offset, length", [(SIZE, 1), (SIZE - 512, 1024), (-1, 1)])
def test_outside_the_image(disk: RawDisk, image: tuple[Path, bytes], offset: int, length: int) -> None:
    """A range past the end is the caller's bug; it fails before any system call, and the image never grows."""
    for call in (disk.preadv, disk.pwritev):
        with pytest.raises(OSError, match="outside the image") as e:
            call([memoryview(bytearray(length))], offset)
        assert e.value.errno == errno.EINVAL
    for zap in (disk.discard, disk.write_zeroes):
        with pytest.raises(OSError, match="outside the image"):
            zap(offset, length)
    assert image[0].read_bytes() == image[1]


def test_io_errors_are_oserrors(disk: RawDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    def enospc(fd: int, views: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", enospc)
    with pytest.raises(OSError) as e:
        disk.pwritev([memoryview(bytes(512))], 0)
    assert e.value.errno == errno.ENOSPC


def test_read_only_disk_refuses_writes(image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, content = image
    forbidden = pytest.fail
    monkeypatch.setattr(rawdisk, "fallocate", forbidden)
    monkeypatch.setattr(os, "fdatasync", forbidden)
    with RawDisk(path, read_only=True) as d:
        buf = bytearray(512)
        assert d.preadv([memoryview(buf)], 512) == 512 and buf == content[512:1024]
        for call in (lambda: d.pwritev([memoryview(bytes(512))], 0), lambda: d.discard(0, 512),
                     lambda: d.write_zeroes(0, 512, unmap=True)):
            with pytest.raises(OSError, match="read-only") as e:
                call()
            assert e.value.errno == errno.EBADF
        d.flush()  # nothing to make stable: no fdatasync
    assert path.read_bytes() == content


# --- discard and write zeroes -------------------------------------------------------------------


def test_discard_punches_a_hole(disk: RawDisk, image: tuple[Path, bytes]) -> None:
    path, content = image
    disk.discard(4096, 4096)
    # ext4 and tmpfs punch holes: zeros, size kept. (Elsewhere a discard may change nothing.)
    assert path.read_bytes() == content[:4096] + bytes(4096) + content[8192:]
    assert os.path.getsize(path) == SIZE


def test_discard_where_holes_are_unsupported_is_a_no_op(disk: RawDisk, image: tuple[Path, bytes],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    modes: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(rawdisk, "fallocate", unsupported)
    disk.discard(0, 4096)
    disk.discard(0, 0)  # nothing to do: no system call
    assert modes == [PUNCH]
    assert image[0].read_bytes() == image[1]


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(disk: RawDisk, image: tuple[Path, bytes], unmap: bool) -> None:
    path, content = image
    disk.write_zeroes(512, 3 * 512, unmap=unmap)
    assert path.read_bytes() == content[:512] + bytes(3 * 512) + content[2048:]
    assert os.path.getsize(path) == SIZE


@pytest.mark.parametrize("unmap, supported, tried, written", [
    (True, {PUNCH, ZERO_RANGE}, [PUNCH], False),  # a hole is cheapest
    (False, {PUNCH, ZERO_RANGE}, [ZERO_RANGE], False),  # no hole without unmap
    (True, {ZERO_RANGE}, [PUNCH, ZERO_RANGE], False),
    (True, set(), [PUNCH, ZERO_RANGE], True),  # neither: write the zeros
    (False, set(), [ZERO_RANGE], True),
])
def test_write_zeroes_fallbacks(disk: RawDisk, image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch,
                                unmap: bool, supported: set[int], tried: list[int], written: bool) -> None:
    modes: list[int] = []
    real = rawdisk.fallocate

    def some(fd: int, mode: int, offset: int, length: int) -> None:
        modes.append(mode)
        if mode not in supported:
            raise OSError(errno.ENOSYS if len(modes) % 2 else errno.EOPNOTSUPP, "not supported")
        real(fd, mode, offset, length)

    writes: list[int] = []
    real_pwritev = os.pwritev

    def counted(fd: int, views: list[memoryview], offset: int) -> int:
        writes.append(offset)
        return real_pwritev(fd, views, offset)

    monkeypatch.setattr(rawdisk, "fallocate", some)
    monkeypatch.setattr(rawdisk, "ZERO_CHUNK", 2048)  # several chunks
    monkeypatch.setattr(os, "pwritev", counted)
    path, content = image
    disk.write_zeroes(512, 10 * 512, unmap=unmap)
    assert modes == tried
    assert writes == ([512, 2560, 4608] if written else [])
    assert path.read_bytes() == content[:512] + bytes(10 * 512) + content[11 * 512:]


def test_fallocate_failure_is_an_oserror(disk: RawDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(rawdisk, "fallocate", eio)
    for call in (lambda: disk.discard(0, 512), lambda: disk.write_zeroes(0, 512)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EIO  # only "unsupported" falls back; a failure is a failure


def test_fallocate_wrapper_reports_errno(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as e:
            rawdisk.fallocate(fd, 0, 0, 4096)  # read-only descriptor
        assert e.value.errno == errno.EBADF
    finally:
        os.close(fd)


# --- flush and close ------------------------------------------------------------------------


def test_flush(disk: RawDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    disk.flush()
    assert synced == [disk.fd]


def test_flush_failure_is_an_oserror(disk: RawDisk, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(OSError):
        disk.flush()


def test_close_twice_and_use_after_close(image: tuple[Path, bytes]) -> None:
    before = open_fds()
    d = RawDisk(image[0])
    d.write_zeroes(0, 512)  # may set up the zero buffer; close() frees it too
    d.close()
    d.close()
    assert d.closed and open_fds() == before
    for call in (lambda: d.preadv([memoryview(bytearray(512))], 0), lambda: d.pwritev([memoryview(bytes(512))], 0),
                 lambda: d.discard(0, 512), lambda: d.write_zeroes(0, 512), d.flush):
        with pytest.raises(OSError, match="closed") as e:
            call()
        assert e.value.errno == errno.EBADF
    RawDisk(image[0]).close()  # the lock went with the descriptor


def test_direct_io(image: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """O_DIRECT wants aligned buffers and offsets; the zeros written where fallocate cannot
    zero come from an mmap, so page aligned."""
    path, content = image
    try:
        d = RawDisk(path, direct=True)
    except ConfigError as e:
        pytest.skip(str(e))

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(rawdisk, "fallocate", unsupported)
    with d:
        assert fcntl.fcntl(d.fd, fcntl.F_GETFL) & os.O_DIRECT
        buf = mmap.mmap(-1, 4096)
        view = memoryview(buf)
        try:
            assert d.preadv([view[:1024]], 1024) == 1024
            assert view[:1024] == content[1024:2048]
            d.write_zeroes(0, 4096)
        finally:
            view.release()
            buf.close()
    assert path.read_bytes() == bytes(4096) + content[4096:]
