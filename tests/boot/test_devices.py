"""The device manager's promises, with a real guest: a failing device ends
the run with a DeviceError, a hostile driver gets DEVICE_NEEDS_RESET while
the VM runs on, counters reach the result, and a disk stuck in a flush
holds up nobody else."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from microvm.arch.x86_64 import layout
from microvm.backends.disk import RawDisk
from microvm.devices.virtio.block import VirtioBlock
from microvm.devices.virtio.mmio import (
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_STATUS,
)
from microvm.errors import DeviceError
from microvm.machine import MicroVM, Nic

MIB = 1 << 20
GUEST, HOST = "172.16.9.2", "172.16.9.1"
STATUS_PORT = 9000
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _image(path: Path, size: int = 4 * MIB) -> Path:
    path.write_bytes(bytes(size))
    return path


def test_a_device_failing_in_its_io_thread_ends_the_run_with_a_device_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: VirtioBlock, queue_index: int) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(VirtioBlock, "process", broken)
    vm = MicroVM(drives=[_image(tmp_path / "d.img")])
    with pytest.raises(DeviceError) as info:
        vm.run(["head", "-c", "512", "/dev/vda"], timeout=120)
    message = str(info.value)
    assert "device vda failed in its I/O thread: RuntimeError: injected fault" in message
    assert "--- console tail ---" in message
    assert vm.vm is None  # everything freed


def test_block_and_transport_counters_reach_the_result(tmp_path: Path) -> None:
    vm = MicroVM(drives=[_image(tmp_path / "a.img"), _image(tmp_path / "b.img")])
    r = vm.run(["sh", "-c", "dd if=/dev/vda of=/dev/vdb bs=64k count=16 iflag=direct oflag=direct conv=fsync"
                            " 2>/dev/null"], timeout=120)
    assert r.exit_code == 0, r.console[-2000:]
    vda, vdb = r.stats["vda"], r.stats["vdb"]
    assert vda["bytes_read"] >= MIB and vda["reads"] >= 1
    assert vdb["bytes_written"] >= MIB and vdb["writes"] >= 1 and vdb["flushes"] >= 1
    assert vda["notifications"] >= 1 and vda["needs_reset"] == 0 and vda["errors"] == 0
    assert "hvc0" in r.stats


def _mmio(offset: int, value: int | None = None) -> str:
    base = layout.VIRTIO_MMIO_BASE + 2 * layout.VIRTIO_MMIO_SIZE  # window 2: vda (0 is hvc0, 1 rng)
    return f"devmem {base + offset:#x} 32" + ("" if value is None else f" {value:#x}")


def test_a_hostile_driver_gets_needs_reset_and_the_vm_runs_on(tmp_path: Path) -> None:
    # Take vda from Linux's driver, then drive its transport by hand (busybox
    # devmem) with a queue whose rings lie outside guest memory.
    script = "; ".join([
        "dev=$(basename $(readlink /sys/block/vda/device))",
        "echo $dev > /sys/bus/virtio/drivers/virtio_blk/unbind",
        _mmio(VIRTIO_MMIO_STATUS, 1), _mmio(VIRTIO_MMIO_STATUS, 3),
        _mmio(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1), _mmio(VIRTIO_MMIO_DRIVER_FEATURES, 1),  # VERSION_1
        _mmio(VIRTIO_MMIO_STATUS, 11), _mmio(VIRTIO_MMIO_STATUS),
        _mmio(VIRTIO_MMIO_QUEUE_SEL, 0), _mmio(VIRTIO_MMIO_QUEUE_NUM, 8),
        _mmio(VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x7F), _mmio(VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0x7F),
        _mmio(VIRTIO_MMIO_QUEUE_USED_HIGH, 0x7F), _mmio(VIRTIO_MMIO_QUEUE_READY, 1),
        _mmio(VIRTIO_MMIO_STATUS),
        _mmio(VIRTIO_MMIO_STATUS, 0), _mmio(VIRTIO_MMIO_STATUS),
        "echo alive",
    ])
    r = MicroVM(drives=[_image(tmp_path / "d.img")]).run(["sh", "-c", script], timeout=120)
    assert r.exit_code == 0, r.console[-2000:]
    # FEATURES_OK accepted; then NEEDS_RESET (64) on top; then reset by writing 0.
    assert r.stdout.split() == [b"0x0000000B", b"0x0000004B", b"0x00000000", b"alive"], r.stdout
    assert r.stats["vda"]["needs_reset"] == 1


@pytest.fixture
def netns() -> Iterator[None]:
    """This thread in a new network namespace (the tap lives there); back afterwards."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            pytest.fail(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())} (needs root)")
        yield
    finally:
        if _libc.setns(original, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
        os.close(original)


def _status_server(held: list[str]) -> tuple[socket.socket, threading.Thread]:
    """A TCP port that answers "held" once vdb's flush is held, "wait" before:
    how the guest learns, over the network, that its next requests race a held flush."""
    server = socket.create_server(("0.0.0.0", STATUS_PORT))  # in this thread's network namespace
    server.settimeout(0.2)

    def serve() -> None:
        while server.fileno() >= 0:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(b"held\n" if held else b"wait\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_a_disk_held_in_flush_holds_up_neither_another_disk_nor_the_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, netns: None) -> None:
    slow = _image(tmp_path / "slow.img")
    release = threading.Event()
    held: list[str] = []
    flush = RawDisk.flush

    def held_flush(self: RawDisk) -> None:
        if Path(self.path) == slow:
            held.append("held")
            release.wait(90)  # as an fdatasync on a stuck device would
            held.append("released by the guest" if release.is_set() else "timed out")
        flush(self)

    seen = bytearray()

    def on_stdout(data: bytes) -> None:
        seen.extend(data)
        if b"others-done" in seen:
            release.set()

    monkeypatch.setattr(RawDisk, "flush", held_flush)
    # vdb's flush is held by the host; meanwhile vda reads, writes and
    # flushes and the network answers; only then does the host let go.
    script = " ".join([
        "(dd if=/dev/zero of=/dev/vdb bs=4k count=1 conv=fsync 2>/dev/null; echo slow-done) &",
        f"until [ \"$(nc {HOST} {STATUS_PORT} 2>/dev/null)\" = held ]; do sleep 0.2; done;",
        "dd if=/dev/vda of=/dev/null bs=4k count=64 iflag=direct 2>/dev/null &&",
        "dd if=/dev/zero of=/dev/vda bs=4k count=16 oflag=direct conv=fsync 2>/dev/null &&",
        f"ping -c 1 -W 10 {HOST} >/dev/null && echo others-done; wait",
    ])
    server, thread = _status_server(held)
    try:
        vm = MicroVM(drives=[_image(tmp_path / "fast.img"), slow], stdout=on_stdout,
                     nics=[Nic(tap="mvtapf0", ip=f"{GUEST}/24", host_ip=f"{HOST}/24")])
        r = vm.run(["sh", "-c", script], timeout=240)
    finally:
        server.close()
        thread.join(5)
    assert r.exit_code == 0, r.console[-2000:]
    assert r.stdout == b"others-done\nslow-done\n"
    assert held == ["held", "released by the guest"]  # released by vda's and eth0's progress, not the timeout
    assert r.stats["vdb"]["flushes"] >= 1 and r.stats["vda"]["flushes"] >= 1
    assert r.stats["eth0"]["rx_frames"] >= 1
