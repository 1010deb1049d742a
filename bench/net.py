"""virtio-net over a tap, microvm against QEMU: `microvm bench net` (microvm/benchmarks/net.py).

    microvm image debian --package iperf3   # once, on the host
    python bench/net.py [--runs 5] [--runtime 5] [--no-qemu] [--out DIR]

The flags are the command's (`--help`); the old `--json FILE` still works and
means `--out` FILE's directory, where the results are net.json.
"""

from _entry import run

if __name__ == "__main__":
    run("net")
