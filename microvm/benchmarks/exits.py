"""Cost of one port-I/O exit: Python bus vs. no-op handler vs. a raw C loop.

The guest (real mode, CPL0) executes `out 0x80, al` N times, then HLT. We
time the whole run and divide by N, for:
  bus     microvm's vCPU loop dispatching each exit to a device on the PioBus
  noop    the same loop, the device's write() does nothing
  mmio    the same loop and no-op device on the MMIO bus (one page: found
          through MmioBus.pages, as a virtio-mmio transport is); the guest
          writes a byte to it instead of a port (KVM decodes the access)
  fast    a 4-byte MMIO write the vCPU answers in C without the GIL (an
          interrupt status word's acknowledgement: bus.MmioBus.fast), as a
          virtio-mmio transport's InterruptStatus reads and InterruptACK writes are
  raw-py  VcpuFd.run() called in a bare Python loop, no dispatch at all
  raw-c-here  the same KVM_RUN loop in C, over a VM microvm made, in this
          process (exits_raw.c built as a library, called through ctypes)
  raw-c   a C program doing the same KVM_RUN loop (exits_raw.c, shipped in
          this package and compiled when the benchmark starts)
All in one invocation, taking turns. raw-c-here against raw-c is what the
process and its VM cost an exit (not Python: no Python runs per exit);
noop against raw-c-here is what Python costs: the second table gives it
as differences of runs that took turns (overheads()). A tiny guest: it runs anywhere /dev/kvm
does, PVM included, with no lane.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType

from microvm import _kvm
from microvm.arch.x86_64 import layout
from microvm.benchmarks import report
from microvm.errors import ConfigError
from microvm.vcpu import StopReason
from microvm.vm import Vm

# mov ecx, N; l: out 0x80, al; dec ecx; jnz l; hlt   (16-bit code, from GNU as)
GUEST = bytes.fromhex("66b9e8030000e680664975faf4")
# mov ecx, N; l: mov [0], al; dec ecx; jnz l; hlt   (ds = MMIO >> 4: outside RAM)
MMIO_GUEST = bytes.fromhex("66b9e8030000a20000664975f9f4")
# mov ecx, N; l: mov [0], eax; dec ecx; jnz l; hlt   (a 4-byte write: what `fast` answers)
FAST_GUEST = bytes.fromhex("66b9e803000066a30000664975f8f4")
MMIO = 0xF0000
CODE = layout.FLAT_CODE  # where the tiny guests start
RAM = 0x10000  # 64 KiB: the guest touches its code and nothing else
PORT = 0x80  # the port GUEST writes (e6 80: out 0x80, al), POST diagnostics on a PC
C_SOURCE = "exits_raw.c"
VARIANTS = ("bus", "noop", "mmio", "fast", "raw-py", "raw-c-here", "raw-c")
OVERHEAD_VARIANTS = ("bus", "noop", "mmio", "raw-py")  # paired with raw-c-here (overheads())
METRIC = "ns_per_exit"
METRICS = {METRIC: ("one port-I/O exit", "ns")}


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


class Acknowledged(Noop):
    """A status word at offset 0 whose 4-byte writes the vCPU answers (FAST_ACK)."""

    def __init__(self) -> None:
        self.isr = _kvm.InterruptStatus()

    def fast_registers(self) -> list[tuple[int, int, _kvm.InterruptStatus]]:
        return [(0, _kvm.FAST_ACK, self.isr)]


def _vm(n: int, guest: bytes = GUEST) -> Vm:
    vm = Vm([(0, RAM)], irqchip=False)
    code = bytearray(guest)
    code[2:6] = n.to_bytes(4, "little")
    vm.mem.write(CODE, code)
    fd = vm.vcpus[0].fd
    sregs = fd.get_sregs()
    sregs["cs"]["base"] = 0
    sregs["cs"]["selector"] = 0
    sregs["ds"]["base"] = MMIO
    sregs["ds"]["selector"] = MMIO >> 4
    fd.set_sregs(sregs)
    regs = fd.get_regs()
    regs.update(rip=CODE, rflags=2)
    fd.set_regs(regs)
    return vm


def run_loop(n: int, device: object, mmio: bool = False) -> float:
    """ns per exit through Vcpu.run_loop (the code path microvm uses)."""
    fast = isinstance(device, Acknowledged)
    with _vm(n, FAST_GUEST if fast else MMIO_GUEST if mmio else GUEST) as vm:
        if mmio:
            vm.mmio.register(MMIO, 0x200, device)  # type: ignore[arg-type]
        else:
            vm.pio.register(PORT, 1, device)  # type: ignore[arg-type]
        vcpu = vm.vcpus[0]
        t0 = time.perf_counter()
        reason = vcpu.run_loop()
        dt = time.perf_counter() - t0
        assert reason is StopReason.HALTED, reason
        assert vcpu.exits == n + 1, vcpu.exits
        assert vcpu.fd.fast_exits == (n if fast else 0), vcpu.fd.fast_exits
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


def compiler() -> str:
    """The C compiler; a ConfigError if there is none (asked before anything runs)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ConfigError("the raw-c variant needs a C compiler: apt-get install gcc")
    return cc


def build_c(tmp: Path, library: bool = False) -> Path:
    """exits_raw.c as the raw-c program, or (`library`) as raw-c-here's shared library."""
    out = tmp / ("exits_raw.so" if library else "exits_raw")
    flags = ["-DEXITS_LIB", "-shared", "-fPIC"] if library else []
    with resources.as_file(resources.files(__package__) / C_SOURCE) as source:
        proc = subprocess.run([compiler(), "-O2", *flags, "-o", str(out), str(source)], capture_output=True,
                              text=True)
    if proc.returncode != 0:
        raise ConfigError(f"{C_SOURCE} did not compile: {proc.stderr.strip()[-2000:]}")
    return out


def load_c(library: Path) -> Callable[[int, Any], float]:
    """raw-c-here's loop: exits_loop(vcpu_fd, byref(c_long)) -> ns per exit."""
    loop = ctypes.CDLL(str(library), use_errno=True).exits_loop
    loop.restype = ctypes.c_double
    loop.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_long)]
    return loop


def raw_c_here(loop: Callable[[int, Any], float], n: int) -> float:
    with _vm(n) as vm:
        exits = ctypes.c_long()
        ns = loop(vm.vcpus[0].fd.fileno(), ctypes.byref(exits))
        if ns < 0:
            raise OSError(ctypes.get_errno(), "exits_loop: KVM_RUN")
        assert exits.value == n, exits.value
    return ns


def raw_c(exe: Path, n: int) -> float:
    out = subprocess.run([str(exe), str(n), GUEST.hex(), hex(CODE)], check=True, capture_output=True,
                         text=True).stdout
    exits, ns = out.split()
    assert int(exits) == n, out
    return float(ns)


def run(exits: int, runs: int, advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="microvm-bench-") as tmp:
        exe, loop = build_c(Path(tmp)), load_c(build_c(Path(tmp), library=True))
        measure: dict[str, Callable[[], float]] = {
            "bus": lambda: run_loop(exits, Counter()), "noop": lambda: run_loop(exits, Noop()),
            "mmio": lambda: run_loop(exits, Noop(), mmio=True),
            "fast": lambda: run_loop(exits, Acknowledged(), mmio=True),
            "raw-py": lambda: raw_py(exits), "raw-c-here": lambda: raw_c_here(loop, exits),
            "raw-c": lambda: raw_c(exe, exits)}
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(runs):
            for variant in VARIANTS:  # taking turns, so drift hits every variant alike
                samples[variant].append(measure[variant]())
                advance(f"run {i + 1} {variant}: {samples[variant][-1]:.0f} ns")
    return {"benchmark": "exits", "exits": exits,
            **report.compare({v: {METRIC: s} for v, s in samples.items()}, [METRIC],
                             [(v, "raw-c-here") for v in ("bus", "noop", "raw-py")]
                             + [("mmio", "noop"), ("fast", "raw-c-here"), ("raw-c-here", "raw-c")]),
            "overhead_ns": overheads(samples)}


def overheads(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """What each variant adds to an exit over raw-c-here, as pairs: the variants
    of run i took turns with each other, so their difference leaves out the
    drift between runs (the raw C loop's own spread is wider than Python's
    share of an exit). Per variant: the median difference, its quartiles and
    extremes, in ns."""
    out = {}
    for variant in OVERHEAD_VARIANTS:
        d = [a - b for a, b in zip(samples[variant], samples["raw-c-here"], strict=True)]
        if d:
            out[variant] = {"pairs": len(d), "median": report.percentile(d, 50), "p25": report.percentile(d, 25),
                            "p75": report.percentile(d, 75), "min": min(d), "max": max(d)}
    return out


def table(result: dict[str, Any]) -> RenderableType:
    """The comparison's table, and the paired overheads over the raw C loop."""
    rows = [(f"{variant} - raw-c-here", o["pairs"], o["median"], f"{o['p25']:.0f}..{o['p75']:.0f}",
             f"{o['min']:.0f}..{o['max']:.0f}") for variant, o in result.get("overhead_ns", {}).items()]
    return Group(report.compare_table(title(result), METRICS, result),
                 report.rows_table("what an exit costs over the raw C loop, per pair of runs (ns)",
                                   ["variant", "pairs", "median", "quartiles", "min..max"], rows))


def title(result: dict[str, Any]) -> str:
    return f"port-I/O and MMIO exits, {result['exits']} per run"
