"""Boot time: microvm against QEMU's microvm machine, same kernel and initramfs.

Measured, in one invocation, alternating runs:
  (a) in-process: MicroVM.start() until our init reports (control device),
      and until the command's output is on the console
  (b) `microvm run -- echo MARK` as a whole process, wall time
  (c) qemu-system-x86_64 -M microvm,acpi=off (KVM) with the same kernel and
      initramfs: process start until the same output line is on the console,
      and until QEMU has exited
Median / min / max over --runs boots each. On a PVM host (no hardware
virtualization) this script re-runs itself inside the QEMU lane.

    python bench/boot.py [--runs 20] [--kernel vmlinux|bzImage|PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _lane import rerun_in_lane_if_pvm

MARK = "microvm-bench-mark"


def _kernel(choice: str) -> Path:
    from microvm.kernelbuild import find_default_kernel

    if choice not in ("vmlinux", "bzImage"):
        return Path(choice)
    art = find_default_kernel()
    if art is None:
        sys.exit("bench/boot.py: no kernel built; run `microvm kernel build`")
    return art.vmlinux if choice == "vmlinux" else art.bzimage


def ours_in_process(kernel: Path) -> tuple[float, float]:
    """(start() -> init reached, start() -> marker line on the console), seconds."""
    from microvm.machine import MicroVM

    seen: list[float] = []
    buf = bytearray()

    def on_output(data: bytes) -> None:
        buf.extend(data)
        if not seen and MARK.encode() in buf:
            seen.append(time.monotonic())

    vm = MicroVM(kernel, mem_mib=128, stdout=on_output)
    t0 = time.monotonic()
    vm.start(["echo", MARK])
    r = vm.wait(120)
    assert r.exit_code == 0, r
    return r.timeline["init reached"], seen[0] - t0


def ours_cli(kernel: Path) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "microvm", "run", "--kernel", str(kernel), "--", "true"],
                   check=True, capture_output=True)
    return time.monotonic() - t0


def qemu(kernel: Path, initrd: Path) -> tuple[float, float]:
    """(process start -> marker on the console, process start -> exit), seconds."""
    argv = [
        "qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-m", "128",
        "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 reboot=t panic=-1 quiet 8250.nr_uarts=1",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    marker = None
    buf = b""
    while True:
        chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
        if not chunk:
            break
        buf += chunk
        if marker is None and MARK.encode() in buf:
            marker = time.monotonic() - t0
    proc.wait(60)
    total = time.monotonic() - t0
    if marker is None:
        raise RuntimeError(f"QEMU never printed the marker:\n{buf[-2000:].decode(errors='replace')}")
    return marker, total


def summarize(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--kernel", default="vmlinux")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    rerun_in_lane_if_pvm()

    from microvm.guestinit import initramfs_for

    kernel = _kernel(args.kernel)
    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp, "initrd.cpio")
        # QEMU has no control device: the command ends the machine itself.
        initrd.write_bytes(initramfs_for(["sh", "-c", f"echo {MARK}; reboot -f"]))
        have_qemu = not args.no_qemu and shutil.which("qemu-system-x86_64") is not None
        res: dict[str, list[float]] = {"a_init": [], "a_marker": [], "b_cli": [], "c_qemu_marker": [],
                                       "c_qemu_exit": []}
        ours_in_process(kernel)  # warm-up: caches, imports
        for i in range(args.runs):
            init, marker = ours_in_process(kernel)
            res["a_init"].append(init)
            res["a_marker"].append(marker)
            res["b_cli"].append(ours_cli(kernel))
            if have_qemu:
                q_marker, q_exit = qemu(kernel, initrd)
                res["c_qemu_marker"].append(q_marker)
                res["c_qemu_exit"].append(q_exit)
            print(f"run {i + 1}/{args.runs}: init {init * 1000:.0f} ms, cli {res['b_cli'][-1] * 1000:.0f} ms"
                  + (f", qemu {res['c_qemu_marker'][-1] * 1000:.0f} ms" if have_qemu else ""), flush=True)
    summary = {k: summarize(v) for k, v in res.items() if v}
    print(f"\nkernel {kernel} ({'lane' if os.environ.get('MICROVM_IN_LANE') == '1' else 'host'})")
    print(f"{'measure':<34} {'median ms':>10} {'min':>8} {'max':>8}")
    labels = {"a_init": "(a) start() -> init reached", "a_marker": "(a) start() -> command output",
              "b_cli": "(b) `microvm run -- true` wall", "c_qemu_marker": "(c) QEMU microvm -> command output",
              "c_qemu_exit": "(c) QEMU microvm wall (to exit)"}
    for k, s in summary.items():
        print(f"{labels[k]:<34} {s['median'] * 1000:10.1f} {s['min'] * 1000:8.1f} {s['max'] * 1000:8.1f}")
    if "c_qemu_marker" in summary:
        q = summary["c_qemu_marker"]["median"]
        print(f"ratio (a) output / (c) output: {summary['a_marker']['median'] / q:.2f}")
        print(f"ratio (b) cli wall / (c) wall: {summary['b_cli']['median'] / summary['c_qemu_exit']['median']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"kernel": str(kernel), "samples": res, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
