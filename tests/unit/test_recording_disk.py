"""The recording disk (microvm/backends/recording.py) on real files: no KVM.

A log holds what reached the disk, in order; DiskLog reads it back, drops a
tail cut short and names anything else wrong; replay() builds the image a
host crash could leave. The lane test tests/boot/test_durability.py runs the
same code under a real guest's ext4.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path
from random import Random

import pytest

from microvm.backends import Backends
from microvm.backends import recording as rec
from microvm.backends.recording import DiskLog, DiskLogError, RecordingDisk, replay
from microvm.devices.virtio.block import VirtioBlock
from microvm.errors import ConfigError
from microvm.specs import Drive
from tests.unit.test_virtio_block import OUTHDR, S_OK, SEGMENT, T_FLUSH, T_OUT, T_WRITE_ZEROES, Disk

SIZE = 16 * 512
A, B, C, D, E = (bytes([c]) * 512 for c in b"ABCDE")


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, bytes]:
    data = Random(7).randbytes(SIZE)
    path = tmp_path / "base.img"
    path.write_bytes(data)
    return path, data


def recorded(tmp_path: Path, base: Path) -> tuple[Path, Path]:
    """A copy of base recorded through a scripted history; returns (image, log).

    history: W0 A@0, FLUSH, W1 B@512, W2 C@1024, ZERO 0+512, FLUSH, W3 D@2048,
    a write past the end (fails), W4 E@512 split over two views, then the VMM "dies"
    (no last flush)."""
    image, log = tmp_path / "disk.img", tmp_path / "disk.log"
    image.write_bytes(base.read_bytes())
    with RecordingDisk(image, log) as disk:
        disk.pwritev([memoryview(A)], 0)
        disk.flush()
        disk.pwritev([memoryview(B)], 512)
        disk.pwritev([memoryview(C)], 1024)
        disk.write_zeroes(0, 512, unmap=True)
        disk.flush()
        disk.pwritev([memoryview(D)], 2048)
        with pytest.raises(OSError) as e:
            disk.pwritev([memoryview(A)], SIZE)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError):
            disk.discard(-512, 512)  # refused before the image is touched: nothing to record
        disk.pwritev([memoryview(E)[:100], memoryview(E)[100:]], 512)
        assert disk.records == 9
    return image, log


def test_round_trip_logs_every_operation_in_order(tmp_path: Path, base: tuple[Path, bytes]) -> None:
    image, path = recorded(tmp_path, base[0])
    log = DiskLog(path)
    assert log.disk_size == SIZE and log.truncated == 0
    got = [(r.kind, r.offset, r.length, r.error, r.flags) for r in log.records]
    assert got == [(rec.WRITE, 0, 512, 0, 0), (rec.FLUSH, 0, 0, 0, 0), (rec.WRITE, 512, 512, 0, 0),
                   (rec.WRITE, 1024, 512, 0, 0), (rec.WRITE_ZEROES, 0, 512, 0, rec.FLAG_UNMAP),
                   (rec.FLUSH, 0, 0, 0, 0), (rec.WRITE, 2048, 512, 0, 0), (rec.WRITE, SIZE, 512, errno.EINVAL, 0),
                   (rec.WRITE, 512, 512, 0, 0)]
    assert [log.data(r) for r in log.records if r.kind == rec.WRITE] == [A, B, C, D, A, E]
    times = [r.time_ns for r in log.records]
    assert times == sorted(times)
    assert log.flushes == [1, 5]
    # The image itself is what RawDisk made of it.
    data = image.read_bytes()
    assert data[:512] == bytes(512) and data[512:1024] == E and data[1024:1536] == C and data[2048:2560] == D
    # Replaying everything that completed gives the same image.
    replay(log, base[0], tmp_path / "all.img", 2, range(2))
    assert (tmp_path / "all.img").read_bytes() == data


def test_a_failed_operation_is_logged_and_never_replayed(tmp_path: Path, base: tuple[Path, bytes]) -> None:
    _, path = recorded(tmp_path, base[0])
    log = DiskLog(path)
    failed = log.records[7]
    assert not failed.completed and "failed: errno 22" in str(failed)
    assert failed not in [r for part in log.epoch(2) for r in part]


def test_epochs_split_at_completed_flushes(tmp_path: Path, base: tuple[Path, bytes]) -> None:
    _, path = recorded(tmp_path, base[0])
    log = DiskLog(path)
    indices = [([r.index for r in durable], [r.index for r in pending])
               for durable, pending in (log.epoch(k) for k in range(3))]
    assert indices == [([], [0]), ([0], [2, 3, 4]), ([0, 2, 3, 4], [6, 8])]


def test_replay_applies_the_durable_part_and_the_chosen_subset(tmp_path: Path, base: tuple[Path, bytes]) -> None:
    path, data = base
    log = DiskLog(recorded(tmp_path, path)[1])
    out = tmp_path / "crash.img"
    assert replay(log, path, out, 0).read_bytes() == data  # nothing was durable
    assert replay(log, path, out, 0, [0]).read_bytes() == A + data[512:]
    # After flush 1: A for sure; of B, C and the zeroing of A only C landed.
    assert replay(log, path, out, 1, [1]).read_bytes() == A + data[512:1024] + C + data[1536:]
    # The zeroing alone: B and C lost, A zeroed.
    assert replay(log, path, out, 1, [2]).read_bytes() == bytes(512) + data[512:]
    # After flush 2: everything before it, then E but not D.
    assert replay(log, path, out, 2, [1]).read_bytes() == bytes(512) + E + C + data[1536:]
    assert path.read_bytes() == data  # the base is left alone


def test_replay_names_its_errors(tmp_path: Path, base: tuple[Path, bytes]) -> None:
    path, _ = base
    log = DiskLog(recorded(tmp_path, path)[1])
    with pytest.raises(DiskLogError, match=r"flush 3 does not exist: the log has 2 completed flushes"):
        replay(log, path, tmp_path / "x.img", 3)
    with pytest.raises(DiskLogError, match=r"flush 1 has 3 pending changes; no change 3"):
        replay(log, path, tmp_path / "x.img", 1, [0, 3])
    small = tmp_path / "small.img"
    small.write_bytes(bytes(512))
    with pytest.raises(DiskLogError, match=rf"recorded a {SIZE}-byte disk, but .*small.img has 512 bytes"):
        replay(log, small, tmp_path / "x.img", 1)


def test_a_tail_cut_anywhere_is_dropped(tmp_path: Path, base: tuple[Path, bytes]) -> None:
    _, path = recorded(tmp_path, base[0])
    whole = path.read_bytes()
    full = DiskLog(path)
    last = full.records[-1]
    start = last.data_at - rec.RECORD.size
    for cut in range(start, len(whole)):  # every byte of the last record: its head, then its data
        path.write_bytes(whole[:cut])
        log = DiskLog(path)
        assert log.records == full.records[:-1]
        assert log.truncated == cut - start
    path.write_bytes(whole[:rec.HEADER.size])
    assert DiskLog(path).records == []


def test_a_corrupt_log_is_named(tmp_path: Path, base: tuple[Path, bytes]) -> None:
    _, path = recorded(tmp_path, base[0])
    whole = bytearray(path.read_bytes())
    log = DiskLog(path)
    second_write = log.records[2]
    bad = tmp_path / "bad.log"

    def fails(data: bytes, match: str) -> None:
        bad.write_bytes(data)
        with pytest.raises(DiskLogError, match=match):
            DiskLog(bad)

    flipped = bytearray(whole)
    flipped[second_write.data_at + 10] ^= 1
    fails(bytes(flipped), r"bad.log: record 2 \(write 512\+512\) at byte \d+: checksum mismatch")
    fails(b"MVBLKLOX" + whole[8:], "not a microvm disk log")
    fails(b"MVBL", "not a microvm disk log")
    fails(whole[:8] + struct.pack("<I", 2) + whole[12:], "log format version 2; this microvm reads version 1")
    kind = bytearray(whole)
    kind[rec.HEADER.size] = 9
    fails(bytes(kind), r"record 0 at byte 24: unknown kind 9")
    with pytest.raises(DiskLogError, match="cannot read"):
        DiskLog(tmp_path / "missing.log")


def test_crash_points_are_seeded_and_in_range(tmp_path: Path, base: tuple[Path, bytes]) -> None:
    log = DiskLog(recorded(tmp_path, base[0])[1])
    points = log.crash_points(subsets=2, seed=3)
    assert points == log.crash_points(subsets=2, seed=3)
    assert sorted({k for k, _ in points}) == [0, 1, 2]
    for k, subset in points:
        pending = len(log.epoch(k)[1])
        assert all(0 <= i < pending for i in subset) and list(subset) == sorted(set(subset))
    assert [s for k, s in points if k == 1].count(()) == 1  # the durable part alone, once per flush
    assert {k for k, _ in log.crash_points(flushes=2)} == {0, 2}  # spread evenly: the first and the last


def test_the_block_device_records_what_the_guest_sends(tmp_path: Path, virtqueue: str) -> None:
    """Requests through virtio-blk reach the log as the device serves them."""
    image, path = tmp_path / "disk.img", tmp_path / "disk.log"
    image.write_bytes(bytes(SIZE))
    d = Disk(image)
    d.raw.close()
    d.raw = RecordingDisk(image, path)
    d.dev.disk = d.raw
    try:
        assert isinstance(d.dev, VirtioBlock)
        assert d.request([(OUTHDR.pack(T_OUT, 0, 2), False), (A + B, False), (1, True)])[0] == S_OK
        assert d.request([(OUTHDR.pack(T_FLUSH, 0, 0), False), (1, True)])[0] == S_OK
        assert d.request([(OUTHDR.pack(T_WRITE_ZEROES, 0, 0), False), (SEGMENT.pack(4, 2, 0), False),
                          (1, True)])[0] == S_OK
    finally:
        d.close()
    log = DiskLog(path)
    assert [(r.kind, r.offset, r.length) for r in log.records] == [
        (rec.WRITE, 1024, 1024), (rec.FLUSH, 0, 0), (rec.WRITE_ZEROES, 2048, 1024)]
    assert log.data(log.records[0]) == A + B


def test_drive_record_option(tmp_path: Path) -> None:
    assert Drive.parse("d.img,record=d.log") == Drive("d.img", record="d.log")
    assert Drive.parse("d.img,direct,record=/x/d.log").record == "/x/d.log"
    with pytest.raises(ConfigError, match=r"expected PATH.*\[,record=LOG\]"):
        Drive.parse("d.img,record=")
    with pytest.raises(ConfigError, match="a read-only drive has none"):
        Drive("d.img", read_only=True, record="d.log")
    with pytest.raises(ConfigError, match="record must be a log file's path, got 3"):
        Drive("d.img", record=3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="record= names the image itself"):
        Drive("d.img", record=os.path.abspath("d.img"))


def test_backends_open_a_recording_disk_and_check_its_log(tmp_path: Path) -> None:
    image, other = tmp_path / "disk.img", tmp_path / "other.img"
    image.write_bytes(bytes(SIZE))
    other.write_bytes(bytes(SIZE))
    b = Backends([Drive(image, record=tmp_path / "disk.log"), Drive(other)], [])
    b.open()
    try:
        assert isinstance(b.disks[0], RecordingDisk) and type(b.disks[1]).__name__ == "RawDisk"
    finally:
        b.close()
    assert DiskLog(tmp_path / "disk.log").records == []
    for drives, match in [
        ([Drive(image, record=tmp_path / "a.log"), Drive(other, record=tmp_path / "a.log")],
         "a.log is given to more than one drive"),
        ([Drive(image, record=other), Drive(other, read_only=True)], "other.img is a drive's disk image"),
        ([Drive(image, record=tmp_path / "no" / "disk.log")], "cannot create its recording log .*No such file"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Backends(drives, []).open()
    assert other.read_bytes() == bytes(SIZE)
