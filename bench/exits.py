"""Cost of one port-I/O exit: Python bus vs. no-op handler vs. a raw C loop.

The guest (real mode, CPL0) executes `out 0x80, al` N times, then HLT. We
time the whole run and divide by N, for:
  bus     microvm's vCPU loop dispatching each exit to a device on the PioBus
  noop    the same loop, the device's write() does nothing
  raw-py  VcpuFd.run() called in a bare Python loop, no dispatch at all
  raw-c   a C program doing the same KVM_RUN loop (compiled here, now)
All in one invocation, alternating, median of --runs runs each.

    python bench/exits.py [--exits 20000] [--runs 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from microvm import _kvm
from microvm.benchmarks.options import int_range, output_file
from microvm.vcpu import StopReason
from microvm.vm import Vm

# mov ecx, N; l: out 0x80, al; dec ecx; jnz l; hlt   (16-bit code, from GNU as)
GUEST = bytes.fromhex("66b9e8030000e680664975faf4")
CODE = 0x1000


class Counter:
    def __init__(self) -> None:
        self.n = 0
        self.last = 0

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.n += 1
        self.last = value


class Noop:
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def _vm(n: int) -> Vm:
    vm = Vm([(0, 0x10000)], irqchip=False)
    code = bytearray(GUEST)
    code[2:6] = n.to_bytes(4, "little")
    vm.mem.write(CODE, code)
    fd = vm.vcpus[0].fd
    sregs = fd.get_sregs()
    sregs["cs"]["base"] = 0
    sregs["cs"]["selector"] = 0
    fd.set_sregs(sregs)
    regs = fd.get_regs()
    regs.update(rip=CODE, rflags=2)
    fd.set_regs(regs)
    return vm


def run_loop(n: int, device: object) -> float:
    """ns per exit through Vcpu.run_loop (the code path microvm uses)."""
    with _vm(n) as vm:
        vm.pio.register(0x80, 1, device)  # type: ignore[arg-type]
        vcpu = vm.vcpus[0]
        t0 = time.perf_counter()
        reason = vcpu.run_loop()
        dt = time.perf_counter() - t0
        assert reason is StopReason.HALTED, reason
        assert vcpu.exits == n + 1, vcpu.exits
    return dt * 1e9 / n


def raw_py(n: int) -> float:
    with _vm(n) as vm:
        run = vm.vcpus[0].fd.run
        hlt = _kvm.Hlt
        t0 = time.perf_counter()
        while type(run()) is not hlt:
            pass
        dt = time.perf_counter() - t0
    return dt * 1e9 / n


def build_c(tmp: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        sys.exit("bench/exits.py: no C compiler (apt-get install gcc)")
    exe = tmp / "exits_raw"
    subprocess.run([cc, "-O2", "-o", str(exe), str(Path(__file__).with_name("exits_raw.c"))], check=True)
    return exe


def raw_c(exe: Path, n: int) -> float:
    out = subprocess.run([str(exe), str(n), GUEST.hex()], check=True, capture_output=True, text=True).stdout
    exits, ns = out.split()
    assert int(exits) == n, out
    return float(ns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exits", type=int_range(1, 2**32 - 1), default=20000)  # the guest's ecx
    ap.add_argument("--runs", type=int_range(1), default=7)
    ap.add_argument("--json", type=output_file)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_c(Path(tmp))
        samples: dict[str, list[float]] = {"bus": [], "noop": [], "raw-py": [], "raw-c": []}
        for _ in range(args.runs):  # alternate, so drift hits every variant alike
            samples["bus"].append(run_loop(args.exits, Counter()))
            samples["noop"].append(run_loop(args.exits, Noop()))
            samples["raw-py"].append(raw_py(args.exits))
            samples["raw-c"].append(raw_c(exe, args.exits))
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"{args.exits} port-I/O exits per run, {args.runs} runs, median ns per exit")
    print(f"{'variant':<8} {'median':>10} {'min':>10} {'max':>10} {'vs raw-c':>9}")
    for k, v in samples.items():
        print(f"{k:<8} {med[k]:10.0f} {min(v):10.0f} {max(v):10.0f} {med[k] / med['raw-c']:8.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"exits": args.exits, "samples_ns": samples, "median_ns": med}, indent=2))


if __name__ == "__main__":
    main()
