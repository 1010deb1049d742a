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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from microvm.benchmarks import qemu
from microvm.benchmarks.options import int_range, kernel_choice, output_file
from microvm.benchmarks.qemu import MARK
from microvm.benchmarks.report import summarize
from microvm.lane import rerun_in_lane_if_pvm


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Every value is checked here, on the host, before any lane starts.
    ap.add_argument("--runs", type=int_range(1), default=20)
    ap.add_argument("--kernel", type=kernel_choice, default="vmlinux", help="vmlinux, bzImage or a kernel file")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--json", type=output_file)
    args = ap.parse_args()

    kernel = _kernel(args.kernel)  # on the host too: the lane sees its files
    # In the lane only a shared directory reaches the host: the JSON's.
    rerun_in_lane_if_pvm(out_dir=args.json.resolve().parent if args.json else None)
    with tempfile.TemporaryDirectory() as tmp:
        initrd = qemu.initramfs(Path(tmp, "initrd.cpio"))
        have_qemu = not args.no_qemu and qemu.available()
        res: dict[str, list[float]] = {"a_init": [], "a_marker": [], "b_cli": [], "c_qemu_marker": [],
                                       "c_qemu_exit": []}
        ours_in_process(kernel)  # warm-up: caches, imports
        for i in range(args.runs):
            init, marker = ours_in_process(kernel)
            res["a_init"].append(init)
            res["a_marker"].append(marker)
            res["b_cli"].append(ours_cli(kernel))
            if have_qemu:
                q = qemu.boot(kernel, initrd)
                res["c_qemu_marker"].append(q.marker_s)
                res["c_qemu_exit"].append(q.exit_s)
            print(f"run {i + 1}/{args.runs}: init {init * 1000:.0f} ms, cli {res['b_cli'][-1] * 1000:.0f} ms"
                  + (f", qemu {res['c_qemu_marker'][-1] * 1000:.0f} ms" if have_qemu else ""), flush=True)
    summary = {k: summarize(v).to_dict() for k, v in res.items() if v}
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
