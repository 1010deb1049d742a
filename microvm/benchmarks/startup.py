"""Start-up of the VMM itself, like with like: microvm and QEMU booting the same
tiny PVH "kernel" (an ELF whose first instructions end the machine).

The guest writes port 0xf4, QEMU's isa-debug-exit (QEMU exits there), then
our control device's EXIT register (microvm ends there), then halts: each
VMM's time from spawning its process to its exit is its start-up to the
guest's first instruction and back, with Linux out of the picture. Both get
the same 128 MiB and our initramfs as their initrd, as a real boot would.
Taking turns, in one invocation:
  python   the interpreter alone (`python -c pass`): the floor under ours
  import   `python -c "import microvm.cli, microvm.machine"`: what our imports add
  microvm  `microvm run --kernel TINY -- true`
  api      MicroVM(TINY).run(["true"]) in this process, as a Python user
           starts a VM: interpreter and imports already paid
  qemu     qemu-system-x86_64 -M microvm -kernel TINY -initrd ...
microvm's in-process timeline (`--timeline`) says where its own part goes.
"""

from __future__ import annotations

import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microvm.arch.x86_64.layout import CONTROL_BASE, QEMU_DEBUG_EXIT_PORT
from microvm.benchmarks import qemu, report
from microvm.devices.control import REG_EXIT
from microvm.errors import ConfigError

VARIANTS = ("python", "import", "microvm", "api", "qemu")
METRIC = "startup_ms"
METRICS = {METRIC: ("spawn to exit", "ms")}
MEM_MIB = 128
ENTRY = 0x100000  # where the code is loaded and entered (paging off, 32-bit)
DEBUG_EXIT_PORT = QEMU_DEBUG_EXIT_PORT  # a write makes QEMU exit with status (value << 1) | 1
XEN_ELFNOTE_PHYS32_ENTRY = 18  # include/xen/interface/elfnote.h
IMPORTS = "import microvm.cli, microvm.machine"


def tiny_kernel() -> bytes:
    """An x86-64 ELF with a PVH entry note (8-byte address, as Linux's head.S
    emits it and QEMU reads it for a 64-bit ELF) and one loadable segment."""
    code = (b"\xb0\x00" + bytes([0xE6, DEBUG_EXIT_PORT])  # mov al, 0; out 0xf4, al
            + b"\xc7\x05" + struct.pack("<II", CONTROL_BASE + REG_EXIT, 0)  # mov dword [EXIT], 0
            + b"\xf4\xeb\xfd")  # hlt; jmp back to the hlt
    note = struct.pack("<III4sQ", 4, 8, XEN_ELFNOTE_PHYS32_ENTRY, b"Xen\0", ENTRY)
    ehdr_size, phdr_size, code_offset = 64, 56, 0x1000
    note_offset = ehdr_size + 2 * phdr_size
    ehdr = struct.pack("<4sBBBBB7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian
                       2, 62, 1, ENTRY, ehdr_size, 0, 0, ehdr_size, phdr_size, 2, 64, 0, 0)  # EXEC, x86-64
    load = struct.pack("<IIQQQQQQ", 1, 5, code_offset, ENTRY, ENTRY, len(code), len(code), 0x1000)  # PT_LOAD r-x
    notes = struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(note), len(note), 4)  # PT_NOTE
    head = ehdr + load + notes + note
    return head + bytes(code_offset - len(head)) + code


def _timed(argv: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    ms = (time.monotonic() - t0) * 1000
    if proc.returncode not in ok:
        raise ConfigError(f"`{' '.join(argv[:4])} ...` exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return ms, proc.stderr


def parse_timeline(stderr: str) -> dict[str, float]:
    """`microvm run --timeline`'s lines ("phase   12.3 ms") as phase -> ms."""
    phases = {}
    for line in stderr.splitlines():
        name, _, rest = line.rpartition("  ")
        if rest.endswith(" ms") and name.strip():
            try:
                phases[name.strip()] = float(rest[:-3])
            except ValueError:
                continue
    return phases


def _api(kernel: Path) -> float:
    from microvm.machine import MicroVM

    t0 = time.monotonic()
    r = MicroVM(kernel, mem_mib=MEM_MIB).run(["true"], timeout=60)
    ms = (time.monotonic() - t0) * 1000
    if r.exit_code != 0:
        raise ConfigError(f"the tiny guest ended with {r.reason}, status {r.exit_code}")
    return ms


def run(runs: int, advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    if not qemu.available():
        raise ConfigError(f"{qemu.QEMU} is not installed: apt-get install qemu-system-x86")
    import microvm
    from microvm.guestinit import initramfs_for

    root = str(Path(microvm.__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix="microvm-bench-") as tmp:
        kernel, initrd = Path(tmp, "tiny.elf"), Path(tmp, "initrd.cpio")
        kernel.write_bytes(tiny_kernel())
        initrd.write_bytes(initramfs_for(["true"]))
        argv = {
            "python": [sys.executable, "-c", "pass"],
            "import": [sys.executable, "-c", IMPORTS],
            "microvm": [sys.executable, "-m", "microvm", "run", "--kernel", str(kernel), "--mem", str(MEM_MIB),
                        "--timeline", "--timeout", "60", "--", "true"],
            "qemu": qemu.command(kernel, initrd, mem_mib=MEM_MIB, cmdline="",
                                 devices=["-device", f"isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=1"]),
        }
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        timelines: list[dict[str, float]] = []
        for i in range(runs):
            for variant in VARIANTS:  # taking turns, so drift hits every variant alike
                if variant == "api":
                    samples[variant].append(_api(kernel))
                    advance(f"run {i + 1} {variant}: {samples[variant][-1]:.0f} ms")
                    continue
                ms, stderr = _timed(argv[variant], env, ok=(1,) if variant == "qemu" else (0,))
                samples[variant].append(ms)
                if variant == "microvm":
                    timelines.append(parse_timeline(stderr))
                advance(f"run {i + 1} {variant}: {ms:.0f} ms")
    phases = [p for p in timelines[0] if all(p in t for t in timelines)] if timelines else []
    return {"benchmark": "startup", "rounds": runs,
            "microvm_timeline_ms": {p: statistics.median(t[p] for t in timelines) for p in phases},
            **report.compare({v: {METRIC: s} for v, s in samples.items()}, [METRIC],
                             [("microvm", "qemu"), ("api", "qemu"), ("import", "python")])}


def title(result: dict[str, Any]) -> str:
    timeline = ", ".join(f"{p} {ms:.1f}" for p, ms in result.get("microvm_timeline_ms", {}).items())
    return f"VMM start-up, a tiny PVH guest, {result['rounds']} runs (microvm's own timeline, ms: {timeline})"
