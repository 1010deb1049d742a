"""Disks: what the guest writes lands in the image file; read-only stays read-only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from microvm.errors import ConfigError
from microvm.images import build_ext4
from microvm.machine import Drive, MicroVM

MIB = 1 << 20


def _image(path: Path, size: int = 8 * MIB, fill: bytes = b"\0") -> Path:
    path.write_bytes(fill * size if len(fill) == 1 else fill)
    return path


def test_guest_writes_a_pattern_the_host_reads(tmp_path: Path) -> None:
    scratch = _image(tmp_path / "scratch.img")
    other = _image(tmp_path / "other.img", fill=b"\xaa")
    script = ('i=0; while [ $i -lt 2000 ]; do echo "microvm-block-$i"; i=$((i+1)); done > /tmp/pattern; '
              'dd if=/tmp/pattern of=/dev/vdb bs=4096 conv=fsync 2>/dev/null && sync && ls /dev/vda /dev/vdb '
              '&& poweroff -f')
    r = MicroVM(drives=[Drive(other, read_only=True), scratch]).run(["sh", "-c", script], timeout=300)
    assert r.reason == "poweroff", r.console[-2000:]
    assert r.stdout == b"/dev/vda\n/dev/vdb\n"
    expected = "".join(f"microvm-block-{i}\n" for i in range(2000)).encode()
    data = scratch.read_bytes()
    assert data[:len(expected)] == expected
    assert data[len(expected):] == b"\0" * (len(data) - len(expected))


def test_read_only_disk_refuses_writes_and_stays_unchanged(tmp_path: Path) -> None:
    image = _image(tmp_path / "ro.img", fill=b"\x5a")
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    r = MicroVM(drives=[Drive(image, read_only=True)]).run(
        ["sh", "-c", "dd if=/dev/zero of=/dev/vda bs=512 count=8 oflag=direct conv=fsync; echo rc=$?; "
                     "head -c 4 /dev/vda"], timeout=300)
    assert "rc=1" in r.output, r.output
    assert ("I/O error" in r.output or "Operation not permitted" in r.output
            or "Read-only" in r.output), r.output
    assert r.output.endswith("ZZZZ")
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_ext4_image_from_a_directory(tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "hello.txt").write_text("hello from an ext4 image\n")
    image = build_ext4(src, tmp_path / "tree.img")
    r = MicroVM(drives=[image]).run(
        ["sh", "-c", "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && cat /mnt/d/sub/hello.txt && "
                     "echo new > /mnt/d/new.txt && umount /mnt/d"], timeout=300)
    assert r.exit_code == 0, r.console[-2000:]
    assert r.stdout == b"hello from an ext4 image\n"


@pytest.mark.parametrize("problem", ["missing", "odd-size", "twice-rw", "directory"])
def test_bad_images_fail_before_the_vm_starts(tmp_path: Path, problem: str) -> None:
    good = _image(tmp_path / "good.img", size=MIB)
    drives: list[Drive] = {
        "missing": [Drive(tmp_path / "nope.img")],
        "odd-size": [Drive(_image(tmp_path / "odd.img", size=1000))],
        "twice-rw": [Drive(good), Drive(good)],
        "directory": [Drive(tmp_path)],
    }[problem]
    vm = MicroVM(drives=drives)
    with pytest.raises(ConfigError, match="disk image"):
        vm.run(["true"], timeout=60)
    assert vm.vm is None


def test_debian_root_image_runs_python() -> None:
    from microvm.images import debian_image_path

    image = debian_image_path()
    if not image.exists():
        pytest.fail(f"no Debian root image at {image}: run `microvm image debian` (scripts/setup does)")
    r = MicroVM(rootfs=Drive(image, read_only=True), mem_mib=256).run(
        ["python3", "-c", "print(1+1)"], timeout=300)
    assert r.exit_code == 0, r.console[-2000:]
    assert r.stdout == b"2\n"


def test_a_rate_limit_holds_direct_writes_to_its_rate(tmp_path: Path) -> None:
    """24 MiB of O_DIRECT writes under 2 MiB/s (a 256 KiB bucket, no burst): about
    12 s, at the set rate within 10 % by the guest's own clock; and the counters say so."""
    import re

    from microvm.ratelimit import RateLimit, TokenBucket

    rate = 2 * MIB
    disk = tmp_path / "d.img"
    with open(disk, "wb") as f:
        f.truncate(32 * MIB)
    limit = RateLimit(bandwidth=TokenBucket(rate, size=256 << 10))
    r = MicroVM(drives=[Drive(disk, rate_limit=limit)]).run(
        ["sh", "-c", "read a _ </proc/uptime; dd if=/dev/zero of=/dev/vda bs=256k count=96 oflag=direct 2>&1 && "
                     "read b _ </proc/uptime && echo uptime $a $b"], timeout=300)
    assert r.exit_code == 0, r.output
    m = re.search(r"uptime ([\d.]+) ([\d.]+)", r.output)
    assert m is not None and "96+0 records out" in r.output, r.output
    moved, seconds = 24 * MIB, float(m.group(2)) - float(m.group(1))
    assert seconds >= 10, r.output
    assert 0.9 * rate <= moved / seconds <= 1.1 * rate, f"{moved / seconds / MIB:.2f} MiB/s, set 2 MiB/s"
    assert r.stats["vda"]["throttled"] > 0 and r.stats["vda"]["bytes_written"] == 24 * MIB
