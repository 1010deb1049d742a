"""Guest networking over virtio-net and TAP: ping, 64 MiB both ways over TCP,
two guests on one bridge, a tap that disappears under a running guest.

Every test runs in a fresh network namespace of its own (the test thread
unshares one and returns to the original afterwards), so taps, bridges and
addresses never touch the host's interfaces, and all of it vanishes with
the namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from microvm.machine import Drive, MicroVM, Nic, RunResult

CLONE_NEWNET = 0x40000000
MIB = 1 << 20
# Each ring wraps hundreds of times. 64 MiB, not 256: in the lane a byte moves
# at ~2.5 MB/s, and the lane's rare freezes come with its nested exits.
BIG = 64 * MIB
GUEST, HOST = "172.16.0.2", "172.16.0.1"
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(autouse=True)
def netns() -> Iterator[None]:
    """Move this thread into a new network namespace with lo up; back afterwards."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.unshare(CLONE_NEWNET) != 0:
            pytest.fail(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())} (needs root)")
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield
    finally:
        if _libc.setns(original, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
        os.close(original)


def nic(tap: str = "mvtap0", **kw: str) -> Nic:
    return Nic(tap=tap, ip=kw.pop("ip", f"{GUEST}/24"), host_ip=kw.pop("host_ip", f"{HOST}/24"), **kw)


def link_names() -> set[str]:
    """Interfaces in this thread's network namespace."""
    lines = Path("/proc/thread-self/net/dev").read_text().splitlines()[2:]
    return {line.split(":")[0].strip() for line in lines}


def test_guest_pings_host_and_tap_is_removed() -> None:
    r = MicroVM(nics=[nic()]).run(["sh", "-c", f"ping -c 3 -W 5 {HOST} && cat /sys/class/net/eth0/address"],
                                  timeout=120)
    assert r.exit_code == 0, r.console[-3000:]
    assert b"3 packets received" in r.stdout, r.stdout
    assert r.stats["eth0"]["tx_frames"] >= 3 and r.stats["eth0"]["rx_frames"] >= 3
    assert "mvtap0" not in link_names()  # the tap we created went with the VM


def test_a_guest_on_a_nic_runs_under_seccomp_kill() -> None:
    """The tap's reads, writes and offload ioctl pass the VMM threads' filter (a miss would kill this process)."""
    r = MicroVM(nics=[nic()], seccomp="kill").run(["ping", "-c", "3", "-W", "5", HOST], timeout=120)
    assert r.exit_code == 0 and b"3 packets received" in r.stdout, (r.stdout, r.console[-2000:])


def test_a_jailed_guest_on_a_nic_pings_the_host() -> None:
    """The tap opened before the jail, used from it (the host's network namespace, no capabilities)."""
    r = MicroVM(nics=[nic()], jail=True, seccomp="kill").run(["ping", "-c", "3", "-W", "5", HOST], timeout=120)
    assert r.exit_code == 0 and b"3 packets received" in r.stdout, (r.stdout, r.console[-2000:])


def test_taps_are_removed_after_a_panic_and_a_timeout() -> None:
    from microvm.machine import GuestPanicError, GuestTimeoutError

    with pytest.raises(GuestPanicError):
        MicroVM(nics=[nic("mvtapp")], append="rdinit=/no/such/init init=/no/such/init").run(["true"], timeout=120)
    assert "mvtapp" not in link_names()
    with pytest.raises(GuestTimeoutError):
        MicroVM(nics=[nic("mvtapt")]).run(["sleep", "600"], timeout=20)
    assert "mvtapt" not in link_names()


def test_mac_and_cli_form() -> None:
    spec = Nic.parse(f"tap=mvtap1,mac=02:aa:bb:cc:dd:ee,ip={GUEST}/24,host_ip={HOST}/24")
    r = MicroVM(nics=[spec]).run(["cat", "/sys/class/net/eth0/address"], timeout=120)
    assert r.stdout == b"02:aa:bb:cc:dd:ee\n"


def guest_connects(vm: MicroVM, command: str, port: int, serve: Callable[[socket.socket], None]) -> RunResult:
    """Start vm running `command` (which connects to HOST:port), serve the one
    connection, wait for the guest. The host address exists once the tap
    does, so the VM starts first and the guest waits a moment."""
    with contextlib.ExitStack() as stack:
        stack.callback(vm.close)
        vm.start(["sh", "-c", f"sleep 1; {command}"])
        srv = socket.create_server((HOST, port))
        stack.callback(srv.close)
        srv.settimeout(240)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(240)
            serve(conn)
        return vm.wait(300)


def test_tcp_64mib_host_to_guest() -> None:
    sent = hashlib.sha256()

    def send(conn: socket.socket) -> None:
        block = os.urandom(MIB)
        for i in range(BIG // MIB):
            chunk = hashlib.sha256(block + i.to_bytes(4, "little")).digest() * (MIB // 32)
            sent.update(chunk)
            conn.sendall(chunk)

    r = guest_connects(MicroVM(mem_mib=256, nics=[nic()]), f"nc {HOST} 5001 </dev/null | sha256sum", 5001, send)
    assert r.exit_code == 0, r.console[-3000:]
    assert r.stdout.split()[0].decode() == sent.hexdigest()
    assert r.stats["eth0"]["rx_bytes"] > BIG


def test_tcp_64mib_guest_to_host(tmp_path: Path) -> None:
    blob = tmp_path / "blob.img"
    with blob.open("wb") as f:
        for _ in range(BIG // MIB):
            f.write(os.urandom(MIB))
    want = hashlib.sha256(blob.read_bytes()).hexdigest()
    got = hashlib.sha256()
    total = 0

    def receive(conn: socket.socket) -> None:
        nonlocal total
        while data := conn.recv(1 << 20):
            got.update(data)
            total += len(data)

    vm = MicroVM(mem_mib=256, nics=[nic()], drives=[Drive(blob, read_only=True)])
    r = guest_connects(vm, f"nc {HOST} 5002 </dev/vda", 5002, receive)
    assert r.exit_code == 0, r.console[-3000:]
    assert total == BIG
    assert got.hexdigest() == want
    assert r.stats["eth0"]["tx_bytes"] > BIG


def test_two_guests_on_a_bridge() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("add", ifname="mvbr0", kind="bridge")
        ipr.link("set", index=ipr.link_lookup(ifname="mvbr0")[0], state="up")
    a = MicroVM(nics=[Nic(tap="mvtapa", bridge="mvbr0", ip="10.77.0.2/24")])
    b = MicroVM(nics=[Nic(tap="mvtapb", bridge="mvbr0", ip="10.77.0.3/24")])
    try:
        a.start(["sh", "-c", "echo hello-from-a | nc -l -p 7000"])
        # Until a listens, b's attempts fail with a message on stderr, which
        # shares hvc0 with stdout: only the last attempt's may be seen.
        b.start(["sh", "-c", "for i in $(seq 100); do nc 10.77.0.2 7000 </dev/null 2>/dev/null && exit 0; "
                             "sleep 0.3; done; exit 1"])
        rb = b.wait(240)
        ra = a.wait(240)
    finally:
        a.close()
        b.close()
    assert rb.exit_code == 0, rb.console[-3000:]
    assert rb.stdout == b"hello-from-a\n"
    assert ra.exit_code == 0


def test_tap_that_disappears_takes_the_link_down() -> None:
    from pyroute2 import IPRoute

    script = (f"ping -c 2 -W 5 {HOST} >/dev/null && echo pinged; "
              "while [ $(cat /sys/class/net/eth0/carrier) = 1 ]; do ping -c 1 -W 1 " + HOST + " >/dev/null; done; "
              "echo carrier-lost")
    vm = MicroVM(nics=[nic()])
    try:
        vm.start(["sh", "-c", script])
        deadline = time.monotonic() + 120
        while b"pinged" not in vm.stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b"pinged" in vm.stdout, vm.console_tail()
        with IPRoute() as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname="mvtap0")[0])
        r = vm.wait(120)
    finally:
        vm.close()
    assert r.exit_code == 0
    assert b"carrier-lost" in r.stdout
    assert r.stats["eth0"]["backend_errors"] >= 1
