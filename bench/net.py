"""virtio-net over a tap: microvm against QEMU's microvm machine, same kernel and image.

In the guest (our kernel, the Debian root image with iperf3 and python3):
  - TCP throughput guest -> host and host -> guest: iperf3 against an
    `iperf3 -s` on the host side (one stream, -O 1 to skip slow start);
  - request/response rate: 1 byte there and back over one TCP connection
    (TCP_NODELAY), as many transactions per second as the guest's python3
    client gets answered by a python echo server on the host side.
The same guest command runs under QEMU's `virtio-net-device` on the same tap
(`-netdev tap,vhost=off`: no vhost-net here), alternating with microvm run
by run. Everything happens in a network namespace this script creates (the
host's interfaces are never touched); it vanishes when the script ends. On a
PVM host this script re-runs itself inside the hardware-virtualization lane.

    microvm image debian --package iperf3   # once, on the host
    python bench/net.py [--runs 5] [--runtime 5] [--json out.json]
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from _compare import ab_parser, alternate, kernel_and_image, qemu_console, report, sides

from microvm.lane import rerun_in_lane_if_pvm

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
CLONE_NEWNET = 0x40000000

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


def parse(output: str) -> dict[str, float]:
    results = {}
    for name in ("guest_to_host", "host_to_guest"):
        m = re.search(rf"=={name}==\s*(\{{.*?\n\}})", output, re.S)
        if not m:
            raise RuntimeError(f"no iperf3 output for {name}:\n{output[-2000:]}")
        report = json.loads(m.group(1))
        if "error" in report:
            raise RuntimeError(f"iperf3 {name}: {report['error']}")
        results[name] = report["end"]["sum_received"]["bits_per_second"] / 1e6
    m = re.search(r"^rr_tps ([\d.]+)$", output, re.M)
    if not m:
        raise RuntimeError(f"no request/response rate:\n{output[-2000:]}")
    results["rr"] = float(m.group(1))
    return results


def enter_netns() -> None:
    """Move this thread (and so every thread and process it starts from now
    on: call it before any VM) into a new network namespace, with lo up and
    our tap, persistent, so that microvm and QEMU attach to the same one in
    turn. It all goes away with the namespace when the script ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit(f"bench/net.py: unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())} (needs root)")
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


def ours(kernel: Path, image: Path, script: str, timeout: float) -> dict[str, float]:
    from microvm.machine import Drive, MicroVM, Nic

    vm = MicroVM(kernel, rootfs=Drive(image, read_only=True), nics=[Nic(tap=TAP, mac=MAC, ip=f"{GUEST}/24")],
                 mem_mib=MEM_MIB)
    r = vm.run(["sh", "-c", script], timeout=timeout)
    if r.exit_code != 0:
        raise RuntimeError(f"the benchmark failed in microvm ({r.exit_code}):\n{r.output[-2000:]}")
    return parse(r.output)


def qemu(kernel: Path, image: Path, script: str, timeout: float) -> dict[str, float]:
    from microvm.specs import Nic

    ip_arg = Nic(tap=TAP, ip=f"{GUEST}/24").kernel_ip_arg("eth0")
    devices = ["-drive", f"id=root,file={image},format=raw,if=none,readonly=on",
               "-device", "virtio-blk-device,drive=root",
               "-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=off",
               "-device", f"virtio-net-device,netdev=net0,mac={MAC}"]
    return parse(qemu_console(kernel, script, append=f"root=/dev/vda {ip_arg}", devices=devices, mem_mib=MEM_MIB,
                              timeout=timeout))


def main() -> None:
    ap = ab_parser(__doc__, "seconds per measurement")
    args = ap.parse_args()
    kernel, image = kernel_and_image("iperf3", "bench/net.py")  # on the host too: the lane sees its files
    # In the lane only a shared directory reaches the host: the JSON's.
    rerun_in_lane_if_pvm(out_dir=args.json.resolve().parent if args.json else None)
    script = guest_script(args.runtime)
    # Boot (slow in a busy lane) and three measurements of about runtime + 1 s.
    timeout = 300 + 3 * len(METRICS) * (args.runtime + 1)
    impls = sides(args, ours, qemu)

    def one_run(fn: Callable[[Path, Path, str, float], dict[str, float]]) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            with host_servers():
                return fn(kernel, image, script, timeout)
        return run

    enter_netns()
    records = alternate({who: one_run(fn) for who, fn in impls.items()}, args.runs)
    report(f"virtio-net, {args.runtime} s per measurement", METRICS, records, args.json, runtime_s=args.runtime)


if __name__ == "__main__":
    main()
