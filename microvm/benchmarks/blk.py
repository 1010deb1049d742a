"""virtio-blk throughput: microvm against QEMU's microvm machine, same image.

In the guest (our kernel, the Debian root image with fio), fio runs on a raw
scratch disk that lives on a host tmpfs (so the host's disk is not measured):
sequential read and write with 1 MiB requests, and 4 KiB random reads,
direct I/O, libaio, iodepth 16. QEMU's side gets the same disks as
`virtio-blk-device`s.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from microvm.benchmarks import ab, qemu

PACKAGE = "fio"
# metric -> fio's rw and block size, the table's label and unit.
JOBS = {
    "seq_read_MBps": ("read", "1M", "sequential read, 1 MiB", "MB/s"),
    "seq_write_MBps": ("write", "1M", "sequential write, 1 MiB", "MB/s"),
    "rand_read_4k_iops": ("randread", "4k", "random read, 4 KiB", "IOPS"),
}
METRICS = {name: (label, unit) for name, (_, _, label, unit) in JOBS.items()} | {
    # From the guest's view: its scratch disk's interrupts (/proc/interrupts) per request fio completed.
    f"{name}_irqs_per_io": (f"{label}: interrupts per request", "irq/io") for name, (_, _, label, _) in JOBS.items()}
MEM_MIB = 512


def fio_script(runtime: int) -> str:
    # The scratch disk is the one that is not the root image: found by its label.
    lines = ["set -e",
             'for d in /dev/vd?; do [ "$(blkid -o value -s LABEL $d 2>/dev/null)" = microvm ] || dev=$d; done',
             # Its virtio device (virtioN), whose line in /proc/interrupts counts its interrupts.
             'v=$(basename "$(readlink -f /sys/block/${dev#/dev/}/device)")',
             "irqs() { awk -v v=\"$v\" '$NF == v { s = 0; for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) s += $i; "
             "print s }' /proc/interrupts; }"]
    for name, (rw, bs, _, _) in JOBS.items():
        # --thread: our kernel has no SysV IPC, which fio's process mode needs.
        lines.append(f'echo "=={name}_irqs== $(irqs)"; echo "=={name}=="; fio --name={name} --filename=$dev '
                     f'--rw={rw} --bs={bs} --direct=1 --ioengine=libaio --iodepth=16 --thread --runtime={runtime} '
                     f'--time_based --output-format=json; echo "=={name}_irqs_after== $(irqs)"')
    return "\n".join(lines)


def parse(output: str) -> ab.Metrics:
    results = {}
    for name, (rw, *_) in JOBS.items():
        job = ab.json_block(output, name)["jobs"][0]
        side = job["write" if "write" in rw else "read"]
        results[name] = side["iops"] if name.endswith("iops") else side["bw_bytes"] / 1e6
        before = re.search(rf"=={name}_irqs== (\d+)", output)
        after = re.search(rf"=={name}_irqs_after== (\d+)", output)
        if before and after and side.get("total_ios"):
            results[f"{name}_irqs_per_io"] = (int(after.group(1)) - int(before.group(1))) / side["total_ios"]
    return results


def scratch_dir() -> Path:
    """A tmpfs where there is one: the scratch disk is then RAM, not the host's disk."""
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def run(runs: int, runtime: int, size_mib: int, with_qemu: bool,
        advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    from microvm.machine import Drive

    kernel, image = ab.kernel_and_image(PACKAGE)
    # Boot and fio's own start-up, slow in a busy lane, plus the three jobs.
    guest = ab.GuestScript(kernel, image, fio_script(runtime), MEM_MIB, timeout=300 + 3 * len(JOBS) * runtime)
    with tempfile.TemporaryDirectory(dir=scratch_dir()) as tmp, qemu.initramfs(guest.script) as initrd:
        disk = Path(tmp, "scratch.img")
        with open(disk, "wb") as f:
            f.write(os.urandom(1 << 20) * size_mib)  # allocated, not sparse
        scratch = ["-drive", f"id=scratch,file={disk},format=raw,if=none",
                   "-device", "virtio-blk-device,drive=scratch"]
        sides = {"microvm": lambda: parse(guest.ours(drives=[Drive(disk)], append="rootfstype=ext4"))}
        if with_qemu:
            sides["qemu"] = lambda: parse(guest.qemu(initrd, root="LABEL=microvm", devices=scratch))
        records, failures = ab.alternate(sides, runs, advance)
    return {"benchmark": "blk", "kernel": str(kernel), "image": str(image), "runtime_s": runtime,
            "size_mib": size_mib, **ab.compared(records, failures, list(METRICS))}


def title(result: dict[str, Any]) -> str:
    return f"virtio-blk, fio {result['runtime_s']} s per job, iodepth 16, direct, {result['size_mib']} MiB disk"
