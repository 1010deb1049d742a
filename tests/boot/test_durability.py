"""Crash consistency of a guest's ext4 on our virtio-blk: what a FLUSH promises.

Killing the VMM alone proves little (the host's page cache keeps every
completed write), so the disk is recorded (backends/recording.py) and the
crashes are replayed: at chosen completed flushes, the image with what was
written before that flush plus seeded random subsets of what came after.
Each must pass `e2fsck -fn` once its journal is recovered (what mounting it
would do), and hold every file the guest reported fsynced before that flush,
byte for byte (read with debugfs, never mounted). Then the kill -9 itself.

A report's time is when the host saw the guest's line: the guest printed it
after its fsync returned, so the flush that made the file durable completed
before, and every flush that completed after the report comes later in the
log. At the last flush of a finished run every report is covered.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from microvm.backends.recording import DiskLog, replay
from microvm.images import mkfs_ext4
from microvm.machine import Drive, MicroVM

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
FILES = 8  # fsynced files the recorded guest writes
FLUSH_POINTS = 10  # completed flushes replayed, spread evenly (the first and the last among them)
SUBSETS = 3  # random subsets of the pending writes per flush, besides none of them
SEED = 16


def durable(i: int) -> bytes:
    return f"durable-{i}\n".encode() * (300 + 1200 * i)


def state(i: int) -> bytes:
    return f"state-{i}\n".encode() * 50


def make_ext4(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(16 * MIB)
    # Inode tables and journal written now, so the guest's kernel writes only what the test does.
    subprocess.run([mkfs_ext4(), "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    str(path)], check=True, capture_output=True)
    return path


# Each round: a file written and fsynced (then its directory), one never fsynced (and an
# older one deleted), and `state` replaced atomically (write, fsync, rename, fsync the directory).
ROUND = """
  yes "durable-$i" | head -n $((300 + 1200 * i)) > data/f$i && sync data/f$i data || exit 1
  echo "fsynced f$i"
  yes "loose-$i" | head -n 2000 > data/loose$i
  [ $i -lt 2 ] || rm data/loose$((i - 2))
  yes "state-$i" | head -n 50 > data/state.tmp && sync data/state.tmp && mv data/state.tmp data/state \
    && sync data || exit 1
  echo "state $i"
  i=$((i + 1))
"""
MOUNT = "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && cd /mnt/d && mkdir -p data || exit 1; i=0; "


class Reports:
    """The guest's report lines, each with the host's monotonic time when it arrived."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, int]] = []
        self._partial = b""

    def __call__(self, data: bytes) -> None:
        now = time.monotonic_ns()
        *whole, self._partial = (self._partial + data).split(b"\n")
        self.lines += [(line.decode(errors="replace"), now) for line in whole]

    def expected(self, before_ns: int | None = None) -> tuple[dict[str, bytes], int]:
        """Files reported fsynced (before `before_ns`, if given) -> contents; and the newest state reported."""
        files, newest = {}, -1
        for line, t in self.lines:
            if before_ns is not None and t >= before_ns:
                continue
            word, _, arg = line.partition(" ")
            if word == "fsynced":
                files[arg] = durable(int(arg[1:]))
            elif word == "state":
                newest = max(newest, int(arg))
        return files, newest


def check_crash_image(image: Path, files: dict[str, bytes], newest_state: int, where: str) -> int:
    """Recover the journal as a mount would, then e2fsck -fn must find nothing, and every
    file in `files` must hold its contents; `state` must be a version >= newest_state.
    Returns the number of files checked."""
    recover = subprocess.run(["e2fsck", "-E", "journal_only", "-y", str(image)], capture_output=True, text=True)
    assert recover.returncode in (0, 1), f"{where}: journal recovery failed: {recover.stdout}{recover.stderr}"
    check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, f"{where}: e2fsck -fn says:\n{check.stdout}{check.stderr}"
    out = image.with_suffix(".files")
    out.mkdir()
    subprocess.run(["debugfs", "-R", f"rdump /data {out}", str(image)], capture_output=True, check=True)
    for name, want in files.items():
        got = (out / "data" / name).read_bytes() if (out / "data" / name).exists() else None
        assert got == want, f"{where}: fsynced file {name} is {'missing' if got is None else 'different'}"
    if newest_state >= 0:
        path = out / "data" / "state"
        got_state = path.read_bytes() if path.exists() else b"(missing)"
        version = got_state.partition(b"\n")[0].removeprefix(b"state-")
        assert version.isdigit() and got_state == state(int(version)) and int(version) >= newest_state, \
            f"{where}: state is {got_state[:12]!r}, not the fsynced state-{newest_state} or newer"
    return len(files) + (newest_state >= 0)


def test_crashes_replayed_at_each_flush_leave_a_clean_ext4_with_the_fsynced_files(
        tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    base = make_ext4(tmp_path / "base.img")
    disk, log_path = tmp_path / "disk.img", tmp_path / "disk.log"
    disk.write_bytes(base.read_bytes())
    reports = Reports()
    # What the guest's kernel makes of the device: a volatile write-back cache, no FUA (README).
    cache = "echo cache $(cat /sys/block/vda/queue/write_cache) fua $(cat /sys/block/vda/queue/fua); "
    script = cache + MOUNT + f"while [ $i -lt {FILES} ]; do {ROUND} done; cd / && umount /mnt/d && echo done"
    r = MicroVM(drives=[Drive(disk, record=log_path)], stdout=reports).run(["sh", "-c", script], timeout=600)
    assert r.exit_code == 0 and r.stdout.endswith(b"done\n"), r.output + r.console[-2000:].decode(errors="replace")
    assert len(reports.expected()[0]) == FILES
    assert reports.lines[0][0] == "cache write back fua 0"

    log = DiskLog(log_path)
    assert log.truncated == 0
    # Each fsync returned only after a flush; the device offers VIRTIO_BLK_F_FLUSH, so the guest sent them.
    assert len(log.flushes) >= FILES, f"{len(log.flushes)} completed flushes for {2 * FILES} fsync rounds"
    assert r.stats["vda"]["flushes"] == len(log.flushes)
    # The whole log replayed is the image the guest left.
    everything = replay(log, base, tmp_path / "all.img", len(log.flushes), range(len(log.epoch(len(log.flushes))[1])))
    whole, left = everything.read_bytes(), disk.read_bytes()
    assert whole == left, f"the whole log replayed differs from the image from byte " \
                          f"{next(i for i, (a, b) in enumerate(zip(whole, left, strict=True)) if a != b)}"

    replays = files_checked = 0
    for n, (k, subset) in enumerate(log.crash_points(flushes=FLUSH_POINTS, subsets=SUBSETS, seed=SEED)):
        # At the last flush of this finished run, every report is covered; before it, those
        # the host saw before the flush completed.
        before = None if k == len(log.flushes) else log.records[log.flushes[k - 1]].time_ns if k else 0
        files, newest = reports.expected(before)
        image = replay(log, base, tmp_path / f"crash{n}.img", k, subset)
        files_checked += check_crash_image(image, files, newest,
                                           f"crash after flush {k} of {len(log.flushes)} with pending {subset}")
        image.unlink()
        replays += 1
    # The last flush point checks every file: the test sees what it claims to.
    assert files_checked >= FILES + 1
    for key, value in {"flushes": len(log.flushes), "records": len(log.records), "replays": replays,
                       "files_checked": files_checked}.items():
        record_property(key, value)


def test_kill_9_mid_write_leaves_a_clean_ext4_with_the_fsynced_files(
        tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    base = make_ext4(tmp_path / "base.img")
    disk, log_path = tmp_path / "disk.img", tmp_path / "disk.log"
    disk.write_bytes(base.read_bytes())
    # Rounds until killed (dozens of them would fit on the disk; it dies after a few).
    script = MOUNT + f"while true; do {ROUND} done"
    proc = subprocess.Popen([sys.executable, "-m", "microvm", "run", "--timeout", "600",
                             "--drive", f"{disk},record={log_path}", "--", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    guard = threading.Timer(600, proc.kill)  # a stuck run fails below instead of hanging the lane
    guard.start()
    try:
        assert proc.stdout is not None
        reports = Reports()
        while len(reports.expected()[0]) < FILES // 2:
            line = proc.stdout.readline()
            assert line, f"the VMM ended before the guest reported: {proc.stderr.read() if proc.stderr else ''!r}"
            reports(line)
        os.kill(proc.pid, signal.SIGKILL)  # while the guest is in its next round's writes
        rest, _ = proc.communicate()
    finally:
        guard.cancel()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not after it
    reports(rest)
    files, newest = reports.expected()

    # The image as the killed VMM left it (the page cache kept every completed write).
    killed = tmp_path / "killed.img"
    killed.write_bytes(disk.read_bytes())
    checked = check_crash_image(killed, files, newest, "the image after kill -9")
    # The recording, perhaps cut mid-record; a crash at its last flush holds every report too.
    log = DiskLog(log_path)
    last = len(log.flushes)
    for n, (k, subset) in enumerate(log.crash_points(flushes=1, subsets=SUBSETS, seed=SEED)):
        assert k == last
        image = replay(log, base, tmp_path / f"crash{n}.img", k, subset)
        checked += check_crash_image(image, files, newest, f"the log after kill -9, last flush, pending {subset}")
    assert checked >= 2 * len(files) > 0
    for key, value in {"kill_flushes": last, "kill_reports": len(files), "kill_truncated_bytes": log.truncated}.items():
        record_property(key, value)
