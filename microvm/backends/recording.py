"""A disk that records what reaches it, and the crash images that record allows.

Killing the VMM cannot lose a completed write: the host's page cache
outlives the process. What a FLUSH really promises shows only when the
host loses what it did not flush, so crash consistency is tested the way
storage engineers do it (Linux's dm-log-writes, then replaying its log):

- RecordingDisk is a RawDisk that appends, in the order the device calls
  it, every write (offset and data), write_zeroes, discard and flush to a
  log file, each with its outcome and the monotonic time it finished. One
  disk is served by one I/O thread, so the log's order is the order the
  image saw.
- DiskLog reads a log back; a tail cut short (the VMM killed mid-record)
  is dropped and counted, anything else malformed is a DiskLogError.
- replay() builds, on a copy of the image the recording started from, a
  state a host crash could leave: every operation before the k-th
  completed flush, and any chosen subset of those between it and the next
  completed flush (a volatile cache may have kept or lost each of them).

Log format, version 1, little-endian:

    header  8s magic b"MVBLKLOG", u32 version, u32 reserved (0), u64 disk size in bytes
    record  u8 kind (1 WRITE, 2 WRITE_ZEROES, 3 DISCARD, 4 FLUSH), u8 error (0: it
            completed, else the errno it failed with), u16 flags (1: UNMAP on a
            WRITE_ZEROES), u64 offset, u64 length (bytes; 0 for FLUSH),
            u64 CLOCK_MONOTONIC ns when it finished, u32 CRC-32 of the record's
            first 28 bytes and its data; then `length` bytes of data for a WRITE.

Replay's choices, each one state a crash could leave: an operation that
failed is never applied (a failed write may have landed in part; leaving it
out is one of the outcomes); a discard reads as zeros (what RawDisk leaves
where it punches a hole); writes are whole (no torn sectors); the pending
subset is applied in log order. The log itself is not fsynced: it survives
the VMM, not the host.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import BinaryIO

from microvm.backends.disk import RawDisk, transfer
from microvm.errors import ConfigError, MicroVMError

MAGIC = b"MVBLKLOG"
VERSION = 1
HEADER = struct.Struct("<8sIIQ")
RECORD = struct.Struct("<BBHQQQI")  # the CRC is the last field; it covers the others and the data
WRITE, WRITE_ZEROES, DISCARD, FLUSH = 1, 2, 3, 4
KIND_NAMES = {WRITE: "write", WRITE_ZEROES: "write_zeroes", DISCARD: "discard", FLUSH: "flush"}
FLAG_UNMAP = 1
_ZEROS = bytes(1 << 20)


class DiskLogError(MicroVMError):
    """A disk log cannot be read or replayed: names the file, the record and what is wrong."""


class RecordingDisk(RawDisk):
    """A RawDisk that logs every change and flush to `log` (created, or truncated).

    A failed operation is logged with its errno and its OSError goes on to the
    device (the guest sees IOERR). A log that cannot be written fails the
    operation too, with EIO: a recording that silently skipped a write would
    make every replay a lie."""

    def __init__(self, path: str | os.PathLike[str], log: str | os.PathLike[str], *, direct: bool = False):
        super().__init__(path, direct=direct)
        self.log_path = os.fspath(log)
        self._lock = threading.Lock()  # one I/O thread per disk; the lock keeps a stray caller's records whole
        try:
            self._log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            super().close()
            raise ConfigError(f"disk image {self.path}: cannot create its recording log "
                              f"{self.log_path}: {e.strerror}") from None
        self._log_end = 0
        self.records = 0
        try:
            self._append([HEADER.pack(MAGIC, VERSION, 0, self.size)])
        except OSError as e:
            self.close()
            raise ConfigError(f"disk image {self.path}: cannot write its recording log "
                              f"{self.log_path}: {e.strerror}") from None

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", recording to {self.log_path!r})"

    def close(self) -> None:
        super().close()
        if getattr(self, "_log", -1) >= 0:
            os.close(self._log)
            self._log = -1

    def pwritev(self, views: Sequence[memoryview], offset: int) -> int:
        length = sum(v.nbytes for v in views)
        try:
            n = super().pwritev(views, offset)
        except OSError as e:
            self._record(WRITE, e.errno or errno.EIO, 0, offset, length, views)
            raise
        self._record(WRITE, 0, 0, offset, length, views)
        return n

    def discard(self, offset: int, length: int) -> None:
        self._logged(DISCARD, 0, offset, length, functools.partial(super().discard, offset, length))

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        self._logged(WRITE_ZEROES, FLAG_UNMAP if unmap else 0, offset, length,
                     functools.partial(super().write_zeroes, offset, length, unmap=unmap))

    def flush(self) -> None:
        self._logged(FLUSH, 0, 0, 0, super().flush)

    def _logged(self, kind: int, flags: int, offset: int, length: int, call: Callable[[], None]) -> None:
        try:
            call()
        except OSError as e:
            self._record(kind, e.errno or errno.EIO, flags, offset, length, ())
            raise
        self._record(kind, 0, flags, offset, length, ())

    def _record(self, kind: int, error: int, flags: int, offset: int, length: int,
                data: Sequence[memoryview]) -> None:
        if offset < 0 or length < 0:
            return  # RawDisk refused it before touching the image (and the format has no room for it)
        # The time is taken after the operation returned: a flush's is when it completed.
        head = RECORD.pack(kind, min(error, 255), flags, offset, length, time.monotonic_ns(), 0)[:-4]
        crc = zlib.crc32(head)
        for view in data:
            crc = zlib.crc32(view, crc)
        try:
            with self._lock:
                self._append([head, struct.pack("<I", crc), *data])
                self.records += 1
        except OSError as e:
            raise OSError(errno.EIO, f"cannot record to {self.log_path}: {e.strerror}") from e

    def _append(self, parts: Sequence[bytes | memoryview]) -> None:
        if self._log < 0:
            raise OSError(errno.EBADF, f"recording log {self.log_path} is closed")
        self._log_end += transfer(os.pwritev, self._log, [memoryview(p) for p in parts], self._log_end)


@dataclass(frozen=True)
class Record:
    """One logged operation; `data_at` is where a WRITE's data starts in the log file."""

    index: int
    kind: int
    error: int
    flags: int
    offset: int
    length: int
    time_ns: int
    data_at: int

    @property
    def completed(self) -> bool:
        return self.error == 0

    def __str__(self) -> str:
        what = KIND_NAMES[self.kind] + ("" if self.kind == FLUSH else f" {self.offset}+{self.length}")
        return f"record {self.index} ({what}{'' if self.completed else f', failed: errno {self.error}'})"


class DiskLog:
    """A recording log, read and checked; the data stays in the file (see data())."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.records: list[Record] = []
        self.truncated = 0  # bytes of a last record cut short, dropped
        try:
            with open(self.path, "rb") as f:
                self._parse(f.read(HEADER.size), f)
        except OSError as e:
            raise DiskLogError(f"disk log {self.path}: cannot read: {e.strerror}") from None
        # Indices of the completed flushes, in order: flush k (1-based) is self.records[self.flushes[k-1]].
        self.flushes = [r.index for r in self.records if r.kind == FLUSH and r.completed]

    def _fail(self, problem: str) -> DiskLogError:
        return DiskLogError(f"disk log {self.path}: {problem}")

    def _parse(self, header: bytes, f: BinaryIO) -> None:
        if len(header) < HEADER.size or header[:8] != MAGIC:
            raise self._fail("not a microvm disk log (no MVBLKLOG header)")
        _, version, _, self.disk_size = HEADER.unpack(header)
        if version != VERSION:
            raise self._fail(f"log format version {version}; this microvm reads version {VERSION}")
        while True:
            at = f.tell()
            raw = f.read(RECORD.size)
            if not raw:
                return
            if len(raw) < RECORD.size:
                self.truncated = len(raw)
                return
            kind, error, flags, offset, length, time_ns, crc = RECORD.unpack(raw)
            record = Record(len(self.records), kind, error, flags, offset, length, time_ns, at + RECORD.size)
            if kind not in KIND_NAMES:
                raise self._fail(f"record {record.index} at byte {at}: unknown kind {kind}")
            data = f.read(length) if kind == WRITE else b""
            if len(data) < (length if kind == WRITE else 0):
                self.truncated = RECORD.size + len(data)
                return
            if zlib.crc32(data, zlib.crc32(raw[:-4])) != crc:
                raise self._fail(f"{record} at byte {at}: checksum mismatch (the log is corrupt)")
            if record.completed and offset + length > self.disk_size:  # a failed one may be out of range
                raise self._fail(f"{record} at byte {at}: beyond the disk's {self.disk_size} bytes")
            self.records.append(record)

    def data(self, record: Record) -> bytes:
        if record.kind != WRITE:
            return b""
        with open(self.path, "rb") as f:
            f.seek(record.data_at)
            return f.read(record.length)

    def epoch(self, flush: int) -> tuple[list[Record], list[Record]]:
        """What a crash after the flush-th completed flush (0: before any) leaves.

        Returns (durable, pending): the completed changes before that flush,
        which are on the disk, and the completed changes after it and before
        the next completed flush, which may or may not be."""
        if not 0 <= flush <= len(self.flushes):
            raise self._fail(f"flush {flush} does not exist: the log has {len(self.flushes)} completed "
                             f"flushes (0 to {len(self.flushes)})")
        start = self.flushes[flush - 1] if flush else 0
        end = self.flushes[flush] if flush < len(self.flushes) else len(self.records)
        changes = [r for r in self.records if r.kind != FLUSH and r.completed]
        return [r for r in changes if r.index < start], [r for r in changes if start <= r.index < end]

    def crash_points(self, *, flushes: int | None = None, subsets: int = 3,
                     seed: int = 0) -> list[tuple[int, tuple[int, ...]]]:
        """(flush, subset) pairs for replay(): up to `flushes` flush indices spread
        evenly over 0..n (all of them if None), each with its durable part alone
        (the empty subset) and `subsets` random subsets of its pending changes,
        drawn from Random(seed): the same seed, the same points."""
        n = len(self.flushes)
        count = n + 1 if flushes is None else max(1, min(flushes, n + 1))
        chosen = sorted({round(i * n / max(1, count - 1)) for i in range(count)}) if count > 1 else [n]
        rng = Random(seed)
        points: list[tuple[int, tuple[int, ...]]] = []
        for k in chosen:
            pending = len(self.epoch(k)[1])
            points.append((k, ()))
            for _ in range(subsets if pending else 0):
                points.append((k, tuple(sorted(rng.sample(range(pending), rng.randint(1, pending))))))
        return points


def replay(log: DiskLog, base: str | os.PathLike[str], out: str | os.PathLike[str], flush: int,
           subset: Iterable[int] = ()) -> Path:
    """Write to `out` the image a crash could leave: `base` (the image as the
    recording began) with the durable changes of log.epoch(flush) and the
    pending ones numbered in `subset` (indices into that list), in log order."""
    durable, pending = log.epoch(flush)
    chosen = sorted(set(subset))
    bad = [i for i in chosen if not 0 <= i < len(pending)]
    if bad:
        raise DiskLogError(f"disk log {log.path}: flush {flush} has {len(pending)} pending changes; "
                           f"no change {bad[0]}")
    size = os.path.getsize(base)
    if size != log.disk_size:
        raise DiskLogError(f"disk log {log.path}: recorded a {log.disk_size}-byte disk, but {os.fspath(base)} "
                           f"has {size} bytes")
    out = Path(out)
    shutil.copyfile(base, out)
    with open(log.path, "rb") as src, open(out, "r+b") as dst:
        for r in [*durable, *(pending[i] for i in chosen)]:
            dst.seek(r.offset)
            if r.kind == WRITE:
                src.seek(r.data_at)
                dst.write(src.read(r.length))
                continue
            left = r.length
            while left:  # WRITE_ZEROES and DISCARD both read as zeros
                left -= dst.write(_ZEROS[:min(left, len(_ZEROS))])
    return out
