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
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _lane import rerun_in_lane_if_pvm

JOBS = {
    "seq_read_MBps": ("read", "1M"),
    "seq_write_MBps": ("write", "1M"),
    "rand_read_4k_iops": ("randread", "4k"),
}


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


def ours(kernel: Path, image: Path, disk: Path, script: str) -> dict[str, float]:
    from microvm.machine import Drive, MicroVM

    vm = MicroVM(kernel, rootfs=Drive(image, read_only=True), drives=[Drive(disk)], mem_mib=512,
                 append="rootfstype=ext4")
    r = vm.run(["sh", "-c", script], timeout=600)
    if r.exit_code != 0:
        raise RuntimeError(f"fio failed in microvm ({r.exit_code}):\n{r.output[-2000:]}")
    return parse(r.output)


def qemu(kernel: Path, image: Path, disk: Path, script: str) -> dict[str, float]:
    from microvm.guestinit import initramfs_for

    with tempfile.TemporaryDirectory() as tmp:
        initrd = Path(tmp, "initrd")
        # QEMU has neither our control device nor virtio-console: the output
        # goes to ttyS0 and the command ends the machine itself.
        # A subshell, so that even a failed script reaches the reboot.
        initrd.write_bytes(initramfs_for(["sh", "-c", f"( {script}\n); reboot -f"]))
        argv = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-m", "512",
                "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
                "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", "console=ttyS0 reboot=t panic=-1 quiet 8250.nr_uarts=1 root=LABEL=microvm",
                "-drive", f"id=root,file={image},format=raw,if=none,readonly=on",
                "-device", "virtio-blk-device,drive=root",
                "-drive", f"id=scratch,file={disk},format=raw,if=none",
                "-device", "virtio-blk-device,drive=scratch"]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                 stdin=subprocess.DEVNULL).stdout
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-3000:]
            text = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            raise RuntimeError(f"QEMU did not finish within 300 s; console tail:\n{text}") from e
    return parse(out.replace("\r\n", "\n"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rerun_in_lane_if_pvm()

    from microvm.images import DEBIAN_PACKAGES, debian_image_path
    from microvm.kernelbuild import find_default_kernel

    image = debian_image_path((*DEBIAN_PACKAGES, "fio"))
    art = find_default_kernel()
    if not image.exists() or art is None:
        sys.exit("bench/blk.py: needs `microvm kernel build` and `microvm image debian --package fio`")
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    script = fio_script(args.runtime)
    samples: dict[str, dict[str, list[float]]] = {"microvm": {}, "qemu": {}}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        disk = Path(tmp, "scratch.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(1 << 20) * args.size_mib)  # allocated, not sparse
        for i in range(args.runs):
            for who, fn in (("microvm", ours), ("qemu", qemu)):
                if who == "qemu" and not have_qemu:
                    continue
                for k, val in fn(art.vmlinux, image, disk, script).items():
                    samples[who].setdefault(k, []).append(val)
            print(f"run {i + 1}/{args.runs} done", flush=True)
    import statistics

    print(f"\n{'metric':<20} {'microvm':>12} {'qemu':>12} {'ratio':>7}")
    summary = {}
    for k in JOBS:
        a = statistics.median(samples["microvm"][k])
        b = statistics.median(samples["qemu"][k]) if samples["qemu"].get(k) else float("nan")
        summary[k] = {"microvm": a, "qemu": b, "ratio": a / b if b == b and b else None}
        print(f"{k:<20} {a:12.1f} {b:12.1f} {a / b if b == b and b else float('nan'):7.2f}")
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
