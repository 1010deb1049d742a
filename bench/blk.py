"""virtio-blk throughput, microvm against QEMU: `microvm bench blk` (microvm/benchmarks/blk.py).

    microvm image debian --package fio      # once, on the host
    python bench/blk.py [--runs 5] [--runtime 5] [--size-mib 256] [--no-qemu] [--out DIR]

The flags are the command's (`--help`); the old `--json FILE` still works and
means `--out` FILE's directory, where the results are blk.json.
"""

from _entry import run

if __name__ == "__main__":
    run("blk")
