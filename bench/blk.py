"""virtio-blk throughput: microvm against QEMU's microvm machine, same image.

In the guest (our kernel, the Debian root image with fio), fio runs on a raw
scratch disk that lives on a host tmpfs (so the host disk is not measured):
sequential read and write with 1 MiB requests, and 4 KiB random reads,
direct I/O, libaio. The same guest command runs under QEMU's
`virtio-blk-device` in the same invocation. On a PVM host this script
re-runs itself inside the hardware-virtualization lane.

    microvm image debian --package fio      # once, on the host
    python bench/blk.py [--runtime 5] [--size-mib 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from _lane import rerun_in_lane_if_pvm

from microvm.benchmarks import qemu as qemu_bench
from microvm.benchmarks.report import summarize

JOBS = {
    "seq_read_MBps": ("read", "1M"),
    "seq_write_MBps": ("write", "1M"),
    "rand_read_4k_iops": ("randread", "4k"),
}
MEM_MIB = 512
# How the command ends QEMU's guest. It runs chrooted into the Debian root,
# which has no reboot(8); /proc/1/root is our init's initramfs, whose busybox
# has one. Before that, stty (tcsetattr with TCSADRAIN) waits until the
# serial port has sent everything: a reboot does not flush the console.
QEMU_END = "stty -F /dev/console -opost; /proc/1/root/bin/busybox reboot -f"


def fio_script(runtime: int) -> str:
    # The scratch disk is the one that is not the root image: find it by label.
    lines = ["set -e",
             'for d in /dev/vd?; do [ "$(blkid -o value -s LABEL $d 2>/dev/null)" = microvm ] || dev=$d; done']
    for name, (rw, bs) in JOBS.items():
        # --thread: our kernel has no SysV IPC, which fio's process mode needs.
        lines.append(f'echo "=={name}=="; fio --name={name} --filename=$dev --rw={rw} --bs={bs} --direct=1 '
                     f'--ioengine=libaio --iodepth=16 --thread --runtime={runtime} --time_based --output-format=json')
    return "\n".join(lines)


def parse(output: str) -> dict[str, float]:
    results = {}
    for name, (rw, _) in JOBS.items():
        m = re.search(rf"=={name}==\s*(\{{.*?\n\}})", output, re.S)
        if not m:
            raise RuntimeError(f"no fio output for {name}:\n{output[-2000:]}")
        job = json.loads(m.group(1))["jobs"][0]
        side = job["write" if "write" in rw else "read"]
        results[name] = side["iops"] if name.endswith("iops") else side["bw_bytes"] / 1e6
    return results


def ours(kernel: Path, image: Path, disk: Path, script: str, timeout: float) -> dict[str, float]:
    from microvm.machine import Drive, MicroVM

    vm = MicroVM(kernel, rootfs=Drive(image, read_only=True), drives=[Drive(disk)], mem_mib=MEM_MIB,
                 append="rootfstype=ext4")
    r = vm.run(["sh", "-c", script], timeout=timeout)
    if r.exit_code != 0:
        raise RuntimeError(f"fio failed in microvm ({r.exit_code}):\n{r.output[-2000:]}")
    return parse(r.output)


def qemu(kernel: Path, image: Path, disk: Path, script: str, timeout: float) -> dict[str, float]:
    from microvm.guestinit import initramfs_for

    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp, "initrd")
        # QEMU has neither our control device nor virtio-console: the output
        # goes straight to ttyS0 and the command must end the machine itself
        # (our init would report to the control device, then wait forever).
        # A subshell, so that even a failed script gets there; reboot=t and
        # -no-reboot: the guest's restart ends QEMU.
        initrd.write_bytes(initramfs_for(["sh", "-c", f"( {script}\n) >/dev/console 2>&1; {QEMU_END}"]))
        argv = [qemu_bench.QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host",
                "-smp", "1", "-m", str(MEM_MIB), "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", f"{qemu_bench.CMDLINE} root=LABEL=microvm",
                "-drive", f"id=root,file={image},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=root",
                "-drive", f"id=scratch,file={disk},format=raw,if=none",
                "-device", "virtio-blk-device,drive=scratch"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout,
                                 stdin=subprocess.DEVNULL).stdout
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-3000:]
            text = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            raise RuntimeError(f"QEMU did not finish within {timeout:.0f} s; console tail:\n{text}") from e
    return parse(out.replace("\r\n", "\n"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    # In the lane, only a shared directory reaches the host: the JSON's.
    rerun_in_lane_if_pvm(out_dir=args.json.resolve().parent if args.json else None)

    from microvm.images import DEBIAN_PACKAGES, debian_image_path
    from microvm.kernelbuild import find_default_kernel

    image = debian_image_path((*DEBIAN_PACKAGES, "fio"))
    art = find_default_kernel()
    if not image.exists() or art is None:
        sys.exit("bench/blk.py: needs `microvm kernel build` and `microvm image debian --package fio`")
    sides = {"microvm": ours}
    if qemu_bench.available():
        sides["qemu"] = qemu
    script = fio_script(args.runtime)
    # Boot and fio's own start-up, slow in a busy lane, plus the three jobs.
    timeout = 300 + 3 * len(JOBS) * args.runtime
    samples: dict[str, dict[str, list[float]]] = {who: {k: [] for k in JOBS} for who in sides}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        disk = Path(tmp, "scratch.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(1 << 20) * args.size_mib)  # allocated, not sparse
        for i in range(args.runs):  # alternating, so drifts in the host's load hit both
            for who, fn in sides.items():
                got = fn(art.vmlinux, image, disk, script, timeout)
                for k, val in got.items():
                    samples[who][k].append(val)
                print(f"run {i + 1}/{args.runs} {who}: " + ", ".join(f"{k} {v:.1f}" for k, v in got.items()),
                      flush=True)
    stats = {who: {k: summarize(v) for k, v in per.items()} for who, per in samples.items()}
    ratio = {k: stats["microvm"][k].median / stats["qemu"][k].median if "qemu" in stats else None for k in JOBS}
    print(f"\nmedian of {args.runs} runs (min-max); ratio = microvm / qemu")
    print(f"{'metric':<18}" + "".join(f"{who:>22}" for who in sides) + f"{'ratio':>7}")
    for k in JOBS:
        cells = "".join(f"{st.median:9.1f} ({st.min:.1f}-{st.max:.1f})".rjust(22)
                        for st in (stats[who][k] for who in sides))
        print(f"{k:<18}{cells}" + (f"{ratio[k]:7.2f}" if ratio[k] is not None else ""))
    if args.json:
        summary = {who: {k: st.to_dict() for k, st in per.items()} for who, per in stats.items()}
        args.json.write_text(json.dumps({"runs": args.runs, "runtime_s": args.runtime, "samples": samples,
                                         "summary": summary, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
