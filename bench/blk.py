"""virtio-blk throughput: microvm against QEMU's microvm machine, same image.

In the guest (our kernel, the Debian root image with fio), fio runs on a raw
scratch disk that lives on a host tmpfs (so the host disk is not measured):
sequential read and write with 1 MiB requests, and 4 KiB random reads,
direct I/O, libaio. The same guest command runs under QEMU's
`virtio-blk-device` in the same invocation. On a PVM host this script
re-runs itself inside the hardware-virtualization lane.

    microvm image debian --package fio      # once, on the host
    python bench/blk.py [--runs 5] [--runtime 5] [--size-mib 256] [--json out.json]
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from functools import partial
from pathlib import Path

from _compare import ab_parser, alternate, kernel_and_image, qemu_console, report, sides

from microvm.benchmarks.options import int_range
from microvm.lane import rerun_in_lane_if_pvm

# metric -> fio's rw and block size, the table's label and unit.
JOBS = {
    "seq_read_MBps": ("read", "1M", "sequential read, 1 MiB", "MB/s"),
    "seq_write_MBps": ("write", "1M", "sequential write, 1 MiB", "MB/s"),
    "rand_read_4k_iops": ("randread", "4k", "random read, 4 KiB", "IOPS"),
}
METRICS = {name: (label, unit) for name, (_, _, label, unit) in JOBS.items()}
MEM_MIB = 512


def fio_script(runtime: int) -> str:
    # The scratch disk is the one that is not the root image: find it by label.
    lines = ["set -e",
             'for d in /dev/vd?; do [ "$(blkid -o value -s LABEL $d 2>/dev/null)" = microvm ] || dev=$d; done']
    for name, (rw, bs, _, _) in JOBS.items():
        # --thread: our kernel has no SysV IPC, which fio's process mode needs.
        lines.append(f'echo "=={name}=="; fio --name={name} --filename=$dev --rw={rw} --bs={bs} --direct=1 '
                     f'--ioengine=libaio --iodepth=16 --thread --runtime={runtime} --time_based --output-format=json')
    return "\n".join(lines)


def parse(output: str) -> dict[str, float]:
    results = {}
    for name, (rw, *_) in JOBS.items():
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
    devices = ["-drive", f"id=root,file={image},format=raw,if=none,readonly=on",
               "-device", "virtio-blk-device,drive=root",
               "-drive", f"id=scratch,file={disk},format=raw,if=none",
               "-device", "virtio-blk-device,drive=scratch"]
    return parse(qemu_console(kernel, script, append="root=LABEL=microvm", devices=devices, mem_mib=MEM_MIB,
                              timeout=timeout))


def main() -> None:
    ap = ab_parser(__doc__, "seconds per fio job")
    ap.add_argument("--size-mib", type=int_range(1), default=256, help="scratch disk size (default 256)")
    args = ap.parse_args()
    kernel, image = kernel_and_image("fio", "bench/blk.py")  # on the host too: the lane sees its files
    # In the lane only a shared directory reaches the host: the JSON's.
    rerun_in_lane_if_pvm(out_dir=args.json.resolve().parent if args.json else None)
    script = fio_script(args.runtime)
    # Boot and fio's own start-up, slow in a busy lane, plus the three jobs.
    timeout = 300 + 3 * len(JOBS) * args.runtime
    impls = sides(args, ours, qemu)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        disk = Path(tmp, "scratch.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(1 << 20) * args.size_mib)  # allocated, not sparse
        records = alternate({who: partial(fn, kernel, image, disk, script, timeout) for who, fn in impls.items()},
                            args.runs)
    report(f"virtio-blk, fio {args.runtime} s per job, iodepth 16, direct", METRICS, records, args.json,
           runtime_s=args.runtime, size_mib=args.size_mib)


if __name__ == "__main__":
    main()
