"""virtio-net over a tap: microvm against QEMU's microvm machine, same kernel and image.

In the guest (our kernel, the Debian root image with iperf3 and python3):
  - TCP throughput guest -> host and host -> guest: iperf3 against an
    `iperf3 -s` on the host side (one stream, -O 1 to skip slow start);
  - request/response rate: 1 byte there and back over one TCP connection
    (TCP_NODELAY), as many transactions per second as the guest's python3
    client gets answered by a python echo server on the host side.
QEMU's side is `virtio-net-device` on the same tap (`-netdev tap,vhost=off`:
no vhost-net here). Everything happens in a network namespace of its own
(the host's interfaces are never touched), which ends with the process.
"""

from __future__ import annotations

import ctypes
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from microvm.benchmarks import ab, qemu
from microvm.benchmarks.guest import RunFailed
from microvm.errors import ConfigError, MicroVMError

PACKAGE = "iperf3"
# metric -> (label, unit); throughput from iperf3's receiver, rate from our client.
METRICS = {
    "guest_to_host": ("TCP guest -> host", "Mbit/s"),
    "host_to_guest": ("TCP host -> guest", "Mbit/s"),
    "rr": ("TCP 1-byte request/response", "trans/s"),
}
MEM_MIB = 512
TAP = "mvbench0"
HOST, GUEST = "172.30.0.1", "172.30.0.2"
# One MAC for both VMMs: the host's neighbour entry for GUEST stays right from run to run.
MAC = "02:6d:76:00:00:02"
IPERF_PORT, RR_PORT = 5201, 5202
CLONE_NEWNET = 0x40000000  # <linux/sched.h>
HOST_TOOLS = ("iperf3", "ip")

# Host side, a process of its own (in our VMM's process it would fight our
# device threads for the GIL): echo whatever arrives, one connection at a time.
RR_SERVER = """
import socket, sys
srv = socket.create_server(("", int(sys.argv[1])))
while True:
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(256):
            conn.sendall(data)
"""

# Guest side (python3 of the Debian image): HOST PORT SECONDS -> transactions per second.
RR_CLIENT = """
import socket, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
for attempt in range(50):
    try:
        s = socket.create_connection((host, port), timeout=10)
        break
    except OSError:
        time.sleep(0.2)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n, t0 = 0, time.monotonic()
end = t0 + seconds
while True:
    s.sendall(b"x")
    if s.recv(1) != b"x":
        sys.exit("echo server went away")
    n += 1
    now = time.monotonic()
    if now >= end:
        break
print(f"rr_tps {n / (now - t0):.1f}")
"""


def guest_script(runtime: int) -> str:
    iperf = f"iperf3 -c {HOST} -p {IPERF_PORT} -t {runtime} -O 1 -J --connect-timeout 10000"
    return "\n".join([
        "set -e",
        f'echo "==guest_to_host=="; {iperf}',
        f'echo "==host_to_guest=="; {iperf} -R',
        f"python3 -c {shlex.quote(RR_CLIENT)} {HOST} {RR_PORT} {runtime}",
    ])


def parse(output: str) -> ab.Metrics:
    results = {}
    for name in ("guest_to_host", "host_to_guest"):
        iperf = ab.json_block(output, name)
        if "error" in iperf:
            raise RunFailed(f"iperf3 {name}: {iperf['error']}")
        results[name] = iperf["end"]["sum_received"]["bits_per_second"] / 1e6
    m = re.search(r"^rr_tps ([\d.]+)$", output, re.M)
    if not m:
        raise RunFailed(f"no request/response rate:\n{output[-2000:]}")
    results["rr"] = float(m.group(1))
    return results


def check_host() -> None:
    """What the host side needs, asked before the lane (which sees the host's files)."""
    missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"the host side needs {' and '.join(missing)}: apt-get install iperf3 iproute2")


def enter_netns() -> None:
    """Move this thread (and so every thread and process it starts from now
    on: call it before any VM) into a new network namespace, with lo up and
    our tap, persistent, so that microvm and QEMU attach to the same one in
    turn. It all goes away with the namespace when the process ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise MicroVMError(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())} (needs root)")
    for cmd in ("link set lo up", f"tuntap add dev {TAP} mode tap", f"addr add {HOST}/24 dev {TAP}",
                f"link set {TAP} up"):
        subprocess.run(["ip", *cmd.split()], check=True)


@contextmanager
def host_servers() -> Iterator[None]:
    """iperf3's server and our echo server, for one VM's run (a fresh iperf3
    each time: one left busy by a killed guest cannot spoil the next run)."""
    with ExitStack() as stack:
        for argv in (["iperf3", "-s", "-p", str(IPERF_PORT)], [sys.executable, "-c", RR_SERVER, str(RR_PORT)]):
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            stack.callback(proc.wait)
            stack.callback(proc.kill)
        time.sleep(0.5)  # listening before the guest (seconds from its first connect) asks
        yield


def run(runs: int, runtime: int, with_qemu: bool, advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from microvm.machine import Nic

    kernel, image = ab.kernel_and_image(PACKAGE)
    # Boot (slow in a busy lane) and three measurements of about runtime + 1 s.
    guest = ab.GuestScript(kernel, image, guest_script(runtime), MEM_MIB,
                           timeout=300 + 3 * len(METRICS) * (runtime + 1))
    nic = Nic(tap=TAP, mac=MAC, ip=f"{GUEST}/24")
    netdev = ["-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=off",
              "-device", f"virtio-net-device,netdev=net0,mac={MAC}"]

    def with_servers(measure: Callable[[], str]) -> Callable[[], ab.Metrics]:
        def one_run() -> ab.Metrics:
            with host_servers():
                return parse(measure())
        return one_run

    enter_netns()
    with qemu.initramfs(guest.script) as initrd:
        sides = {"microvm": with_servers(lambda: guest.ours(nics=[nic]))}
        if with_qemu:
            sides["qemu"] = with_servers(lambda: guest.qemu(initrd, root=f"/dev/vda {nic.kernel_ip_arg('eth0')}",
                                                            devices=netdev))
        records, failures = ab.alternate(sides, runs, advance)
    return {"benchmark": "net", "kernel": str(kernel), "image": str(image), "runtime_s": runtime,
            **ab.compared(records, failures, list(METRICS))}


def title(result: dict[str, Any]) -> str:
    return f"virtio-net, {result['runtime_s']} s per measurement"
